"""One-shot all-reduce over buffers every rank maps (CUDA IPC), for the small tensors of tensor-parallel decode.

A decode step of a sharded model all-reduces two ``[batch, hidden]`` tensors per layer. NCCL spends about 20 us
on each (its kernel plus the gaps around it in a CUDA graph), more than the layer's matmuls at batch 1. Here each
rank copies its tensor into its own staging buffer, tells every peer it is there (a flag in the peer's memory,
written with system-scope release), waits for every peer's flag (acquire), and sums all ranks' staging buffers in
rank order, so every rank gets bit-identical results (vLLM's "one-shot" custom all-reduce, written in Triton).

Safety without a second barrier: every call launches the same ``GRID`` programs; program ``c`` of every rank
handles the same elements, and keeps a call counter (its epoch) in local memory. Calls alternate between two halves
of the staging buffers by the epoch's parity. A rank's program ``c`` writes the half of call ``e`` only after its
own call ``e - 1``, which waited for every peer's program ``c`` to start call ``e - 1``, so every peer finished its
call ``e - 2`` (kernels run in stream order): the half ``e`` reuses is no longer read by anyone. Peers wait for
flags ``>= e``, since a fast peer may already have announced ``e + 1``. Epochs are int32 and wrap after 2**31 calls
(a day of decoding): the parity is taken with ``& 1`` and flags are compared by wrapping difference.

``all_reduce_torch`` is the reference: the same sum in float32, in rank order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Programs per call: every rank launches exactly this many, each waiting on the same program of its peers.
GRID = 32
BLOCK = 1024


def all_reduce_torch(shards: list[torch.Tensor]) -> torch.Tensor:
    """Reference: the ranks' tensors summed in float32 in rank order, cast back."""
    total = torch.zeros_like(shards[0], dtype=torch.float32)
    for shard in shards:
        total += shard.float()
    return total.to(shards[0].dtype)


@triton.jit
def _one_shot_all_reduce_kernel(x_ptr, n, staging_ptrs, flag_ptrs, epoch_ptr, half_elements,
                                RANK: tl.constexpr, WORLD: tl.constexpr, GRID: tl.constexpr,
                                BLOCK: tl.constexpr):
    program = tl.program_id(0)
    epoch = tl.load(epoch_ptr + program) + 1
    tl.store(epoch_ptr + program, epoch)
    dtype = x_ptr.dtype.element_ty
    half = (epoch & 1).to(tl.int64) * half_elements
    own = tl.load(staging_ptrs + RANK).to(tl.pointer_type(dtype)) + half
    for start in range(program * BLOCK, n, GRID * BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(own + offsets, tl.load(x_ptr + offsets, mask=mask), mask=mask)
    tl.debug_barrier()  # every thread's staging stores happen before the flags are raised
    for peer in tl.static_range(WORLD):
        flags = tl.load(flag_ptrs + peer).to(tl.pointer_type(tl.int32))
        tl.atomic_xchg(flags + RANK * GRID + program, epoch, sem="release", scope="sys")
    own_flags = tl.load(flag_ptrs + RANK).to(tl.pointer_type(tl.int32))
    for peer in tl.static_range(WORLD):
        seen = tl.atomic_add(own_flags + peer * GRID + program, 0, sem="acquire", scope="sys")
        while seen - epoch < 0:  # wrapping int32 difference: right across the counter's overflow
            seen = tl.atomic_add(own_flags + peer * GRID + program, 0, sem="acquire", scope="sys")
    tl.debug_barrier()  # every thread reads the peers' data after the flags were seen
    for start in range(program * BLOCK, n, GRID * BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < n
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for peer in tl.static_range(WORLD):
            source = tl.load(staging_ptrs + peer).to(tl.pointer_type(dtype)) + half
            total += tl.load(source + offsets, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(x_ptr + offsets, total.to(dtype), mask=mask)


def one_shot_all_reduce(x: torch.Tensor, staging_ptrs: torch.Tensor, flag_ptrs: torch.Tensor,
                        epochs: torch.Tensor, half_bytes: int, rank: int) -> None:
    """Sum ``x`` (contiguous, at most ``half_bytes``) over the ranks in place.

    ``staging_ptrs``/``flag_ptrs``: int64 device tensors with every rank's staging buffer (two halves of
    ``half_bytes``) and flag array (``world * GRID`` int32, zeroed) as mapped in this process; ``epochs``: this
    rank's ``GRID`` int32 call counters (zeroed once, never touched elsewhere).
    """
    world = staging_ptrs.numel()
    if x.numel() * x.element_size() > half_bytes or not x.is_contiguous():
        raise ValueError(f"one_shot_all_reduce takes a contiguous tensor of at most {half_bytes} bytes")
    _one_shot_all_reduce_kernel[(GRID,)](
        x, x.numel(), staging_ptrs, flag_ptrs, epochs, half_bytes // x.element_size(),
        RANK=rank, WORLD=world, GRID=GRID, BLOCK=BLOCK, num_warps=4,
    )
