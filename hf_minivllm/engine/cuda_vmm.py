"""CUDA virtual memory through the driver API (ctypes): a fixed address range whose physical memory comes and goes.

The KV cache lives at one virtual address for the engine's whole life, so CUDA graphs captured against it stay
valid, while physical memory is mapped in as the cache grows and unmapped (given back to the driver, where PyTorch's
allocator or another model can take it) when it shrinks. This is how vLLM's sleep mode and SGLang's memory saver
release KV memory; here it needs no compiled extension.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
from typing import Iterator

import torch

_ALLOCATION_TYPE_PINNED = 1
_LOCATION_TYPE_DEVICE = 1
_ACCESS_PROT_READWRITE = 3
_GRANULARITY_MINIMUM = 0
_ERROR_OUT_OF_MEMORY = 2
_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 102


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _AllocationProp(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", _Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", _AllocFlags)]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


class CudaOutOfMemory(RuntimeError):
    """The driver has no physical memory left for a mapping."""


@functools.lru_cache(maxsize=1)
def _driver() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    u64, size_t = ctypes.c_uint64, ctypes.c_size_t
    signatures = {
        "cuMemGetAllocationGranularity": [ctypes.POINTER(size_t), ctypes.POINTER(_AllocationProp), ctypes.c_int],
        "cuMemAddressReserve": [ctypes.POINTER(u64), size_t, size_t, u64, ctypes.c_ulonglong],
        "cuMemAddressFree": [u64, size_t],
        "cuMemCreate": [ctypes.POINTER(u64), size_t, ctypes.POINTER(_AllocationProp), ctypes.c_ulonglong],
        "cuMemRelease": [u64],
        "cuMemMap": [u64, size_t, size_t, u64, ctypes.c_ulonglong],
        "cuMemUnmap": [u64, size_t],
        "cuMemSetAccess": [u64, size_t, ctypes.POINTER(_AccessDesc), size_t],
        "cuGetErrorString": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
        "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
        "cuDeviceGetAttribute": [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int],
        "cuDevicePrimaryCtxRetain": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int],
        "cuDevicePrimaryCtxRelease_v2": [ctypes.c_int],
        "cuCtxGetCurrent": [ctypes.POINTER(ctypes.c_void_p)],
        "cuCtxSetCurrent": [ctypes.c_void_p],
    }
    for name, argtypes in signatures.items():
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = ctypes.c_int
    return lib


def _check(result: int, what: str) -> None:
    if result == 0:
        return
    message = ctypes.c_char_p()
    _driver().cuGetErrorString(result, ctypes.byref(message))
    text = f"{what} failed: CUDA driver error {result} ({(message.value or b'?').decode()})"
    raise CudaOutOfMemory(text) if result == _ERROR_OUT_OF_MEMORY else RuntimeError(text)


@contextlib.contextmanager
def _primary_context(device: torch.device) -> Iterator[None]:
    """Make ``device``'s primary context (the one PyTorch's runtime uses) current on this thread for the block, then
    put back the thread's own. A thread that has made no CUDA runtime call (a garbage-collecting thread, a caller's
    worker thread) has no current context, and every driver call then fails with CUDA_ERROR_INVALID_CONTEXT;
    ``torch.cuda.device`` binds none when the device is already the thread's current one."""
    driver, handle, context, previous = _driver(), ctypes.c_int(), ctypes.c_void_p(), ctypes.c_void_p()
    _check(driver.cuDeviceGet(ctypes.byref(handle), device.index), "cuDeviceGet")
    _check(driver.cuCtxGetCurrent(ctypes.byref(previous)), "cuCtxGetCurrent")
    _check(driver.cuDevicePrimaryCtxRetain(ctypes.byref(context), handle.value), "cuDevicePrimaryCtxRetain")
    try:
        _check(driver.cuCtxSetCurrent(context), "cuCtxSetCurrent")
        try:
            yield
        finally:
            driver.cuCtxSetCurrent(previous)
    finally:
        driver.cuDevicePrimaryCtxRelease_v2(handle.value)


def virtual_memory_available(device: torch.device) -> bool:
    """Whether the driver API's virtual memory management can be used on ``device`` from this process."""
    if device.type != "cuda":
        return False
    try:
        torch.cuda.init()
        driver, handle, supported = _driver(), ctypes.c_int(), ctypes.c_int()
        index = device.index if device.index is not None else torch.cuda.current_device()
        _check(driver.cuDeviceGet(ctypes.byref(handle), index), "cuDeviceGet")
        _check(driver.cuDeviceGetAttribute(ctypes.byref(supported), _ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
                                           handle.value), "cuDeviceGetAttribute")
        if not supported.value:
            return False
        allocation_granularity(device)
        return True
    except (OSError, AttributeError, RuntimeError):
        return False


def _properties(device: torch.device) -> _AllocationProp:
    prop = _AllocationProp()
    prop.type = _ALLOCATION_TYPE_PINNED
    prop.location.type = _LOCATION_TYPE_DEVICE
    prop.location.id = device.index if device.index is not None else torch.cuda.current_device()
    return prop


def allocation_granularity(device: torch.device) -> int:
    """Bytes every mapping's size and offset must be a multiple of (2 MiB on current GPUs)."""
    granularity = ctypes.c_size_t()
    prop = _properties(device)
    _check(_driver().cuMemGetAllocationGranularity(ctypes.byref(granularity), ctypes.byref(prop),
                                                   _GRANULARITY_MINIMUM), "cuMemGetAllocationGranularity")
    return granularity.value


class _CudaArray:
    """Presents a device address range to ``torch.as_tensor`` (zero copy, no ownership)."""

    def __init__(self, address: int, num_bytes: int):
        self.__cuda_array_interface__ = {
            "shape": (num_bytes,), "typestr": "|u1", "data": (address, False), "version": 3, "strides": None,
        }


class VirtualRange:
    """``size`` bytes of reserved device address space; ``map``/``unmap`` back parts of it with physical memory.

    ``tensor()`` views the whole range as bytes; only mapped parts may be touched. ``close`` unmaps everything and
    frees the range (also done at garbage collection).
    """

    def __init__(self, device: torch.device, size: int):
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        self.granularity = allocation_granularity(self.device)
        if size <= 0 or size % self.granularity:
            raise ValueError(f"size must be a positive multiple of {self.granularity} bytes, got {size}")
        self.size = size
        self._mappings: dict[int, tuple[int, int]] = {}  # offset -> (size, physical handle)
        address = ctypes.c_uint64()
        with _primary_context(self.device):
            _check(_driver().cuMemAddressReserve(ctypes.byref(address), size, self.granularity, 0, 0),
                   "cuMemAddressReserve")
        self.address = address.value

    @property
    def mapped_bytes(self) -> int:
        return sum(size for size, _ in self._mappings.values())

    def mapped_offsets(self) -> list[int]:
        """Where each mapping starts, in address order."""
        return sorted(self._mappings)

    def map(self, offset: int, size: int) -> None:
        """Back ``[offset, offset + size)`` with new physical memory; raises ``CudaOutOfMemory`` when there is none."""
        if offset % self.granularity or size % self.granularity or offset + size > self.size or size <= 0:
            raise ValueError(f"mapping [{offset}, {offset + size}) is not granule-aligned inside {self.size} bytes")
        driver, handle = _driver(), ctypes.c_uint64()
        prop = _properties(self.device)
        with _primary_context(self.device):
            _check(driver.cuMemCreate(ctypes.byref(handle), size, ctypes.byref(prop), 0), "cuMemCreate")
            try:
                _check(driver.cuMemMap(self.address + offset, size, 0, handle.value, 0), "cuMemMap")
                access = _AccessDesc()
                access.location.type = _LOCATION_TYPE_DEVICE
                access.location.id = self.device.index
                access.flags = _ACCESS_PROT_READWRITE
                try:
                    _check(driver.cuMemSetAccess(self.address + offset, size, ctypes.byref(access), 1),
                           "cuMemSetAccess")
                except RuntimeError:
                    driver.cuMemUnmap(self.address + offset, size)
                    raise
            except RuntimeError:
                driver.cuMemRelease(handle.value)
                raise
        self._mappings[offset] = (size, handle.value)

    def unmap(self, offset: int) -> None:
        """Release the mapping made at ``offset`` (the device must not be using it any more)."""
        size, handle = self._mappings.pop(offset)
        driver = _driver()
        with _primary_context(self.device):
            _check(driver.cuMemUnmap(self.address + offset, size), "cuMemUnmap")
            _check(driver.cuMemRelease(handle), "cuMemRelease")

    def tensor(self) -> torch.Tensor:
        """The whole range as a uint8 tensor on the device (it does not own the memory)."""
        return torch.as_tensor(_CudaArray(self.address, self.size), device=self.device)

    def close(self) -> None:
        if self.address is None:
            return
        for offset in sorted(self._mappings, reverse=True):
            self.unmap(offset)
        with _primary_context(self.device):
            _check(_driver().cuMemAddressFree(self.address, self.size), "cuMemAddressFree")
        self.address = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the driver may already be gone
            pass
