"""Where the paged KV cache's memory comes from: allocated once, or grown with demand and given back when idle.

Every storage exposes one tensor ``[2, num_layers, capacity_blocks, block_size, num_kv_heads, head_dim]`` (keys,
then values; one contiguous slab per layer, as the kernels expect). Blocks below ``num_blocks`` are usable.

- ``FixedKVStorage``: all blocks allocated up front and kept (vLLM's behaviour; ``kv_cache_resident=True``).
- ``VirtualKVStorage`` (CUDA): the tensor spans reserved virtual memory for the cap; physical memory is mapped in
  as the cache grows and unmapped when it shrinks. The tensor's address never changes, so captured CUDA graphs
  stay valid whatever the cache's size.
- ``ReallocKVStorage`` (CPU, and CUDA without virtual memory support when graphs are off): a new tensor per size,
  live blocks copied over.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hf_minivllm.engine.cuda_vmm import CudaOutOfMemory, VirtualRange, allocation_granularity


@dataclass(frozen=True)
class KVLayout:
    """The shape of one KV block across the model (this rank's heads)."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def block_bytes(self) -> int:
        """Bytes of one block in one layer's key (or value) slab."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block over every layer, keys and values."""
        return 2 * self.num_layers * self.block_bytes

    def shape(self, num_blocks: int) -> tuple[int, ...]:
        return (2, self.num_layers, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)


class KVCacheStorage:
    layout: KVLayout
    capacity_blocks: int  # the most blocks this storage may ever hold
    floor_blocks: int  # what it keeps while idle
    num_blocks: int  # blocks usable now
    tensor: torch.Tensor

    def grow(self, min_blocks: int, wanted_blocks: int, budget_bytes: int) -> int:
        """Hold at least ``min_blocks`` (aiming at ``wanted_blocks``) without taking more than ``budget_bytes`` of
        new memory; returns the blocks held now (unchanged when ``min_blocks`` cannot be reached)."""
        return self.num_blocks

    def shrink(self) -> int:
        """Give memory above the floor back; only while no block above it is in use. Returns the blocks held now."""
        return self.num_blocks

    def close(self) -> None:
        """Release everything; the storage cannot be used afterwards."""
        self.tensor = torch.empty(0)
        self.num_blocks = 0

    def _target(self, min_blocks: int, wanted_blocks: int, budget_bytes: int, unit: int = 1) -> int:
        """The block count a growth aims at: ``wanted`` within the cap and budget, in whole ``unit``s."""
        affordable = self.num_blocks + max(budget_bytes, 0) // self.layout.bytes_per_block
        target = min(max(min_blocks, wanted_blocks), self.capacity_blocks, affordable)
        target = min(math.ceil(target / unit) * unit, self.capacity_blocks)
        return target if target >= min_blocks else self.num_blocks


class FixedKVStorage(KVCacheStorage):
    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device):
        self.layout = layout
        self.capacity_blocks = self.floor_blocks = self.num_blocks = num_blocks
        self.tensor = torch.empty(layout.shape(num_blocks), dtype=layout.dtype, device=device)


class ReallocKVStorage(KVCacheStorage):
    def __init__(self, layout: KVLayout, floor_blocks: int, capacity_blocks: int, device: torch.device):
        self.layout = layout
        self.device = device
        self.capacity_blocks = capacity_blocks
        self.floor_blocks = self.num_blocks = min(floor_blocks, capacity_blocks)
        self.tensor = torch.empty(layout.shape(self.num_blocks), dtype=layout.dtype, device=device)

    def _resize(self, num_blocks: int) -> None:
        tensor = torch.empty(self.layout.shape(num_blocks), dtype=self.layout.dtype, device=self.device)
        kept = min(num_blocks, self.num_blocks)
        tensor[:, :, :kept].copy_(self.tensor[:, :, :kept])
        self.tensor, self.num_blocks = tensor, num_blocks

    def grow(self, min_blocks: int, wanted_blocks: int, budget_bytes: int) -> int:
        target = self._target(min_blocks, wanted_blocks, budget_bytes)
        if target > self.num_blocks:
            self._resize(target)
        return self.num_blocks

    def shrink(self) -> int:
        if self.num_blocks > self.floor_blocks:
            self._resize(self.floor_blocks)
        return self.num_blocks


class VirtualKVStorage(KVCacheStorage):
    """Each of the ``2 * num_layers`` slabs is mapped from its start up to ``num_blocks`` blocks; a growth maps one
    new piece per slab and a shrink unmaps every piece above the floor."""

    def __init__(self, layout: KVLayout, floor_blocks: int, capacity_blocks: int, device: torch.device):
        self.layout = layout
        granularity = allocation_granularity(device)
        # Blocks per slab must fill whole granules, so every slab starts granule-aligned.
        self.unit = granularity // math.gcd(granularity, layout.block_bytes)
        self.capacity_blocks = max(capacity_blocks // self.unit, 1) * self.unit
        self.floor_blocks = min(math.ceil(floor_blocks / self.unit) * self.unit, self.capacity_blocks)
        self.slab_bytes = self.capacity_blocks * layout.block_bytes
        self.num_slabs = 2 * layout.num_layers
        self.range = VirtualRange(device, self.num_slabs * self.slab_bytes)
        self.num_blocks = 0
        if not self._map_up_to(self.floor_blocks):
            self.range.close()
            raise CudaOutOfMemory(f"no device memory for the KV cache's first {self.floor_blocks} blocks")
        self.tensor = self.range.tensor().view(layout.dtype).view(layout.shape(self.capacity_blocks))

    @property
    def mapped_bytes(self) -> int:
        return self.range.mapped_bytes

    def _map_up_to(self, num_blocks: int) -> bool:
        """Map every slab from ``self.num_blocks`` to ``num_blocks``; all or nothing. False when the device has no
        memory for it; any other driver error is raised (after undoing the slabs already mapped)."""
        start, size = self.num_blocks * self.layout.block_bytes, (num_blocks - self.num_blocks) * self.layout.block_bytes
        done = []
        try:
            for slab in range(self.num_slabs):
                offset = slab * self.slab_bytes + start
                self.range.map(offset, size)
                done.append(offset)
        except RuntimeError as error:
            for offset in done:
                self.range.unmap(offset)
            if isinstance(error, CudaOutOfMemory):
                return False
            raise
        self.num_blocks = num_blocks
        return True

    def grow(self, min_blocks: int, wanted_blocks: int, budget_bytes: int) -> int:
        target = self._target(min_blocks, wanted_blocks, budget_bytes, self.unit)
        if target <= self.num_blocks:
            return self.num_blocks
        least = min(math.ceil(min_blocks / self.unit) * self.unit, self.capacity_blocks)
        for attempt in dict.fromkeys((target, least)):  # the driver may have less than PyTorch's figures say
            if self._map_up_to(attempt):
                break
        return self.num_blocks

    def shrink(self) -> int:
        if self.num_blocks <= self.floor_blocks:
            return self.num_blocks
        torch.cuda.synchronize(self.range.device)
        floor_bytes = self.floor_blocks * self.layout.block_bytes
        for offset in self.range.mapped_offsets():
            if offset % self.slab_bytes >= floor_bytes:
                self.range.unmap(offset)
        self.num_blocks = self.floor_blocks
        return self.num_blocks

    def close(self) -> None:
        super().close()
        self.range.close()


def growth_budget(device: torch.device, gpu_memory_utilization: float, keep_free_bytes: int) -> Callable[[], int]:
    """Bytes a CUDA KV cache may take now: free device memory (plus what PyTorch caches unused, released on
    demand) beyond ``1 - gpu_memory_utilization`` of the device and ``keep_free_bytes`` for activations."""

    def budget() -> int:
        free, total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached - total * (1 - gpu_memory_utilization) - keep_free_bytes)

    return budget
