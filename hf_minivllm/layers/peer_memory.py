"""Buffers every rank of a group maps into its own address space (CUDA IPC), for the one-shot all-reduce of
``hf_minivllm.kernels.all_reduce``.

Each rank allocates a staging buffer and a flag array straight from the CUDA driver (so PyTorch's allocator
settings, such as expandable segments, do not matter), publishes their CUDA IPC handles in the group's store, and
opens its peers' (no shared-memory files are involved). All ranks use it or none does: where a rank cannot (no peer
access between the GPUs, or ``HF_MINIVLLM_PEER_ALL_REDUCE=0``), every rank keeps NCCL, with a warning saying why.
"""
from __future__ import annotations

import ctypes
import logging
import os
import pickle
import weakref

import torch
import torch.distributed as dist

from hf_minivllm.kernels.all_reduce import GRID, one_shot_all_reduce

logger = logging.getLogger(__name__)

# Largest tensor taken (bytes): decode activations up to batch 64 at hidden 4096 in bf16. Larger ones go to NCCL:
# with 32 programs the one-shot kernel moved 2 MiB slower than NCCL (W1 at TP=2 fell from 12.7k to 11.3k tok/s).
MAX_BYTES = 512 << 10
_LAZY_ENABLE_PEER_ACCESS = 1
_KEY = "hf_minivllm_peer_all_reduce"


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * 64)]  # not c_char, whose value stops at the first zero byte


class _Driver:
    """The few CUDA driver calls IPC needs (the runtime's are not exposed by torch)."""

    def __init__(self, device: torch.device):
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.device_index = torch.cuda._get_device_index(device, optional=True)
        self._context = ctypes.c_void_p()
        self._retained: ctypes.c_int | None = None  # the device whose primary context this driver holds

    def make_current(self) -> None:
        """Make the device's primary context (the one PyTorch's runtime uses) current on the calling thread. A
        thread that has made no CUDA runtime call yet (the TP rendezvous thread, a garbage-collecting thread) has no
        current context, and every driver call then fails with CUDA_ERROR_INVALID_CONTEXT (201): ``torch.cuda.device``
        does not bind one when the device is already the thread's current device. The context stays retained until
        ``release``: PyTorch may hold no reference to it yet, and the memory allocated here lives in it."""
        if self._retained is None:
            device = ctypes.c_int()
            self._call("cuDeviceGet", ctypes.byref(device), ctypes.c_int(self.device_index))
            self._call("cuDevicePrimaryCtxRetain", ctypes.byref(self._context), device)
            self._retained = device
        self._call("cuCtxSetCurrent", self._context)

    def _call(self, name: str, *args) -> None:
        """Call the driver function ``name`` (exact symbol: some ``_v2`` symbols take other arguments)."""
        result = getattr(self.lib, name)(*args)
        if result != 0:
            raise RuntimeError(f"{name} failed with CUDA driver error {result}")

    def allocate_zeroed(self, num_bytes: int) -> int:
        """A device allocation of its own (exportable whatever PyTorch's allocator does), zero-filled."""
        pointer = ctypes.c_uint64()
        self._call("cuMemAlloc_v2", ctypes.byref(pointer), ctypes.c_size_t(num_bytes))
        self._call("cuMemsetD8_v2", ctypes.c_uint64(pointer.value), ctypes.c_ubyte(0), ctypes.c_size_t(num_bytes))
        return pointer.value

    def export(self, pointer: int) -> bytes:
        handle = _IpcHandle()
        self._call("cuIpcGetMemHandle", ctypes.byref(handle), ctypes.c_uint64(pointer))
        return bytes(handle)

    def open(self, handle: bytes) -> int:
        """This process's address of a peer's exported allocation."""
        pointer = ctypes.c_uint64()
        self._call("cuIpcOpenMemHandle_v2", ctypes.byref(pointer), _IpcHandle.from_buffer_copy(handle),
                   ctypes.c_uint(_LAZY_ENABLE_PEER_ACCESS))
        return pointer.value

    def release(self, own: list[int], opened: list[int]) -> None:
        """Unmap the peers' memory, free this rank's, drop the context reference. A finalizer may run this on any
        thread: that thread's current context is put back afterwards."""
        previous = ctypes.c_void_p()
        try:
            self._call("cuCtxGetCurrent", ctypes.byref(previous))
            self.make_current()
        except RuntimeError as error:  # a driver already shutting down: nothing left to free
            logger.debug("peer memory not released: %s", error)
            return
        for pointer in opened:
            self.lib.cuIpcCloseMemHandle(ctypes.c_uint64(pointer))
        for pointer in own:
            self.lib.cuMemFree_v2(ctypes.c_uint64(pointer))
        self.lib.cuCtxSetCurrent(previous)
        self.lib.cuDevicePrimaryCtxRelease_v2(self._retained)
        self._retained = None


class PeerAllReduce:
    """This rank's staging buffer, flags and call counters, and every rank's buffers as mapped here."""

    def __init__(self, rank: int, device: torch.device, staging_ptrs: list[int], flag_ptrs: list[int],
                 own: list[int], opened: list[int], driver: _Driver):
        self.rank = rank
        self._epochs = torch.zeros(GRID, dtype=torch.int32, device=device)
        self._staging_ptrs = torch.tensor(staging_ptrs, dtype=torch.int64, device=device)
        self._flag_ptrs = torch.tensor(flag_ptrs, dtype=torch.int64, device=device)
        # Unmapped and freed with this object; not at interpreter exit, when the driver may be gone already.
        self._release = weakref.finalize(self, driver.release, own, opened)
        self._release.atexit = False

    @classmethod
    def create(cls, rank: int, size: int, device: torch.device, store: dist.Store) -> PeerAllReduce | None:
        """Set up on every rank at once (they meet in ``store``); None on every rank when any rank cannot."""
        own: list[int] = []
        published, driver, reason = None, None, "HF_MINIVLLM_PEER_ALL_REDUCE=0"
        if os.environ.get("HF_MINIVLLM_PEER_ALL_REDUCE", "1") != "0":
            try:
                with torch.cuda.device(device):
                    torch.cuda.init()
                    driver = _Driver(device)
                    driver.make_current()
                    own = [driver.allocate_zeroed(2 * MAX_BYTES), driver.allocate_zeroed(size * GRID * 4)]
                    published = [driver.export(pointer) for pointer in own]
                    torch.cuda.synchronize(device)  # the zero fill is done before any peer maps the flags
            except (OSError, RuntimeError) as error:
                reason = f"rank {rank} cannot export device memory ({error})"
        store.set(f"{_KEY}/{rank}", pickle.dumps((published, reason)))
        everyone = [pickle.loads(store.get(f"{_KEY}/{peer}")) for peer in range(size)]
        opened: list[int] = []
        pointers: list[list[int]] = [[], []]  # staging, flags
        reasons = [reason for entry, reason in everyone if entry is None]
        if not reasons:
            try:
                with torch.cuda.device(device):
                    driver.make_current()
                    for peer, (handles, _) in enumerate(everyone):
                        for kind, handle in enumerate(handles):
                            pointers[kind].append(own[kind] if peer == rank else driver.open(handle))
                            if peer != rank:
                                opened.append(pointers[kind][-1])
            except (OSError, RuntimeError) as error:
                reasons.append(f"rank {rank} cannot map its peers' memory ({error})")
        store.set(f"{_KEY}/ok/{rank}", pickle.dumps(reasons))
        reasons = sorted({reason for peer in range(size) for reason in pickle.loads(store.get(f"{_KEY}/ok/{peer}"))})
        if reasons:
            if driver is not None:
                driver.release(own, opened)
            if reasons != ["HF_MINIVLLM_PEER_ALL_REDUCE=0"]:
                logger.warning("tensor-parallel all-reduces stay on NCCL: %s", "; ".join(reasons))
            return None
        return cls(rank, device, pointers[0], pointers[1], own, opened, driver)

    def fits(self, tensor: torch.Tensor) -> bool:
        """Whether this all-reduce takes ``tensor`` (the same answer on every rank for the same call)."""
        return (tensor.is_contiguous() and tensor.dtype in (torch.bfloat16, torch.float16, torch.float32)
                and tensor.numel() * tensor.element_size() <= MAX_BYTES)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        one_shot_all_reduce(tensor, self._staging_ptrs, self._flag_ptrs, self._epochs, MAX_BYTES, self.rank)
