"""Buffers every rank of a group maps into its own address space (CUDA IPC), for the one-shot all-reduce of
``hf_minivllm.kernels.all_reduce``.

Each rank allocates a staging buffer and a flag array, publishes their CUDA IPC handles in the group's store, and
opens its peers' (through the CUDA driver, so no shared-memory files are involved). All ranks use it or none does:
where a rank cannot (no peer access between the GPUs, an allocator without IPC such as expandable segments, or
``HF_MINIVLLM_PEER_ALL_REDUCE=0``), every rank keeps NCCL.
"""
from __future__ import annotations

import ctypes
import logging
import os
import pickle

import torch
import torch.distributed as dist

from hf_minivllm.kernels.all_reduce import GRID, one_shot_all_reduce

logger = logging.getLogger(__name__)

# Largest tensor taken (bytes): decode steps' activations; prefill chunks go to NCCL.
MAX_BYTES = 4 << 20
_LAZY_ENABLE_PEER_ACCESS = 1
_KEY = "hf_minivllm_peer_all_reduce"


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]


class _Driver:
    """The few CUDA driver calls IPC needs (the runtime's are not exposed by torch)."""

    def __init__(self):
        self.lib = ctypes.CDLL("libcuda.so.1")

    def _call(self, name: str, *args) -> None:
        function = getattr(self.lib, name + "_v2", None) or getattr(self.lib, name)
        result = function(*args)
        if result != 0:
            raise RuntimeError(f"{name} failed with CUDA driver error {result}")

    def export(self, tensor: torch.Tensor) -> tuple[bytes, int]:
        """The IPC handle of the allocation holding ``tensor``, and the tensor's offset inside it."""
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        self._call("cuMemGetAddressRange", ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(tensor.data_ptr()))
        handle = _IpcHandle()
        self._call("cuIpcGetMemHandle", ctypes.byref(handle), ctypes.c_uint64(base.value))
        return bytes(handle.reserved), tensor.data_ptr() - base.value

    def open(self, handle: bytes, offset: int) -> int:
        """This process's address of a peer's exported tensor."""
        pointer = ctypes.c_uint64()
        self._call("cuIpcOpenMemHandle", ctypes.byref(pointer), _IpcHandle(handle), ctypes.c_uint(_LAZY_ENABLE_PEER_ACCESS))
        return pointer.value + offset

    def close(self, pointer: int) -> None:
        self.lib.cuIpcCloseMemHandle(ctypes.c_uint64(pointer))


class PeerAllReduce:
    """This rank's staging buffer, flags and call counters, and every rank's as mapped here."""

    def __init__(self, rank: int, size: int, device: torch.device, staging: torch.Tensor, flags: torch.Tensor,
                 staging_ptrs: list[int], flag_ptrs: list[int], opened: list[int], driver: _Driver):
        self.rank, self.size = rank, size
        self._staging, self._flags = staging, flags  # kept alive: the peers read and write them
        self._epochs = torch.zeros(GRID, dtype=torch.int32, device=device)
        self._staging_ptrs = torch.tensor(staging_ptrs, dtype=torch.int64, device=device)
        self._flag_ptrs = torch.tensor(flag_ptrs, dtype=torch.int64, device=device)
        self._opened, self._driver = opened, driver

    @classmethod
    def create(cls, rank: int, size: int, device: torch.device, store: dist.Store) -> PeerAllReduce | None:
        """Set up on every rank at once (they meet in ``store``); None on every rank when any rank cannot."""
        disabled = os.environ.get("HF_MINIVLLM_PEER_ALL_REDUCE", "1") == "0"
        published = None
        if not disabled:
            try:
                with torch.cuda.device(device):
                    staging = torch.empty(2 * MAX_BYTES, dtype=torch.uint8, device=device)
                    flags = torch.zeros(size * GRID, dtype=torch.int32, device=device)
                    torch.cuda.synchronize(device)
                driver = _Driver()
                published = (driver.export(staging), driver.export(flags))
            except (OSError, RuntimeError) as error:
                logger.info("rank %d cannot share memory with its peers (%s); all-reduce stays on NCCL", rank, error)
        store.set(f"{_KEY}/{rank}", pickle.dumps(published))
        everyone = [pickle.loads(store.get(f"{_KEY}/{peer}")) for peer in range(size)]
        opened: list[int] = []
        try:
            if any(entry is None for entry in everyone):
                raise RuntimeError("a rank cannot export its buffers")
            staging_ptrs, flag_ptrs = [], []
            with torch.cuda.device(device):
                for peer, (staging_export, flags_export) in enumerate(everyone):
                    if peer == rank:
                        staging_ptrs.append(staging.data_ptr())
                        flag_ptrs.append(flags.data_ptr())
                        continue
                    for export, pointers in ((staging_export, staging_ptrs), (flags_export, flag_ptrs)):
                        pointers.append(driver.open(*export))
                        opened.append(pointers[-1] - export[1])
            ok = True
        except (OSError, RuntimeError) as error:
            logger.info("rank %d cannot map its peers' buffers (%s); all-reduce stays on NCCL", rank, error)
            ok = False
        store.set(f"{_KEY}/ok/{rank}", "1" if ok else "0")
        if not all(store.get(f"{_KEY}/ok/{peer}") == b"1" for peer in range(size)):
            for pointer in opened:
                driver.close(pointer)
            return None
        return cls(rank, size, device, staging, flags, staging_ptrs, flag_ptrs, opened, driver)

    def fits(self, tensor: torch.Tensor) -> bool:
        """Whether this all-reduce takes ``tensor`` (the same answer on every rank for the same call)."""
        return (tensor.is_contiguous() and tensor.dtype in (torch.bfloat16, torch.float16, torch.float32)
                and tensor.numel() * tensor.element_size() <= MAX_BYTES)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        one_shot_all_reduce(tensor, self._staging_ptrs, self._flag_ptrs, self._epochs, MAX_BYTES, self.rank)

    def close(self) -> None:
        """Unmap the peers' buffers (after the device finished every call using them)."""
        for pointer in self._opened:
            self._driver.close(pointer)
        self._opened = []
