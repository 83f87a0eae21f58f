"""One-shot all-reduce over buffers every rank maps (CUDA IPC), for the small tensors of tensor-parallel decode, alone
or fused with the residual add and RMSNorm that follow it in a decoder layer.

A decode step of a sharded model all-reduces two ``[batch, hidden]`` tensors per layer. NCCL spends about 20 us
on each (its kernel plus the gaps around it in a CUDA graph), more than the layer's matmuls at batch 1. Here each
rank pushes its tensor into its own slot of every peer's staging buffer (stores over NVLink, which do not wait for
an answer), raises a flag in each peer's memory (system-scope release), waits for every peer's flag in its own
memory (acquire) and sums the slots, all local now, in rank order: every rank gets bit-identical results. With
``residual`` and a norm weight the same kernel then adds the residual and normalises each row, exactly as
``hf_minivllm.kernels.rms_norm``'s fused kernel does after a separate all-reduce, which saves that kernel's launch
and a pass over memory twice per layer.

Safety without a second barrier: every call launches the same ``GRID`` programs; program ``c`` of every rank
handles the same elements, and keeps a call counter (its epoch) in local memory. Calls alternate between two halves
of the staging buffers by the epoch's parity. A rank's program ``c`` writes the half of call ``e`` only after its
own call ``e - 1``, which waited for every peer's program ``c`` to start call ``e - 1``, so every peer finished its
call ``e - 2`` (kernels run in stream order): the half ``e`` reuses is no longer read by anyone. Since every call
runs every program, calls that split their elements differently (whole rows for the fused kernel, 1,024-element
chunks otherwise) can follow each other. Peers wait for flags ``>= e``, since a fast peer may already have
announced ``e + 1``. Epochs are int32 and wrap after 2**31 calls (a day of decoding): the parity is taken with
``& 1`` and flags are compared by wrapping difference.

``all_reduce_torch`` is the reference: the same sum in float32, in rank order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Programs per call: every rank launches exactly this many, each waiting on the same program of its peers.
GRID = 32
BLOCK = 1024  # elements per program and chunk of the plain all-reduce
MAX_HIDDEN = 16384  # widest row the fused kernel normalises (one row per program pass)


def all_reduce_torch(shards: list[torch.Tensor]) -> torch.Tensor:
    """Reference: the ranks' tensors summed in float32 in rank order, cast back."""
    total = torch.zeros_like(shards[0], dtype=torch.float32)
    for shard in shards:
        total += shard.float()
    return total.to(shards[0].dtype)


@dataclass(frozen=True)
class PeerBuffers:
    """One rank's view of the group's buffers.

    ``staging_ptrs``/``flag_ptrs``: int64 device tensors with every rank's staging buffer (two halves of ``world``
    slots of ``slot_bytes``) and flag array (``world * GRID`` int32, zeroed) as mapped in this process;
    ``epochs``: this rank's ``GRID`` int32 call counters (zeroed once, never touched elsewhere).
    """

    staging_ptrs: torch.Tensor
    flag_ptrs: torch.Tensor
    epochs: torch.Tensor
    slot_bytes: int
    rank: int

    @property
    def world(self) -> int:
        return self.staging_ptrs.numel()


@triton.jit
def _one_shot_all_reduce_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, n, unit_size, eps,
                                staging_ptrs, flag_ptrs, epoch_ptr, slot_elements,
                                RANK: tl.constexpr, WORLD: tl.constexpr, GRID: tl.constexpr, BLOCK: tl.constexpr,
                                FUSE_NORM: tl.constexpr, UNIT_OFFSET: tl.constexpr):
    program = tl.program_id(0)
    epoch = tl.load(epoch_ptr + program) + 1
    tl.store(epoch_ptr + program, epoch)
    dtype = x_ptr.dtype.element_ty
    half = (epoch & 1).to(tl.int64) * WORLD * slot_elements  # this call's half: [WORLD, slot_elements]
    cols = tl.arange(0, BLOCK)
    num_units = tl.cdiv(n, unit_size)  # rows (fused) or chunks of BLOCK elements; program c takes c, c + GRID, ...
    for unit in range(program, num_units, GRID):
        offsets = unit * unit_size + cols
        mask = (cols < unit_size) & (offsets < n)
        x = tl.load(x_ptr + offsets, mask=mask)
        for peer in tl.static_range(WORLD):
            if peer != RANK:
                slot = tl.load(staging_ptrs + peer).to(tl.pointer_type(dtype)) + half + RANK * slot_elements
                tl.store(slot + offsets, x, mask=mask)
    tl.debug_barrier()  # every thread's stores happen before the flags are raised
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            flags = tl.load(flag_ptrs + peer).to(tl.pointer_type(tl.int32))
            tl.atomic_xchg(flags + RANK * GRID + program, epoch, sem="release", scope="sys")
    own_flags = tl.load(flag_ptrs + RANK).to(tl.pointer_type(tl.int32))
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            seen = tl.atomic_add(own_flags + peer * GRID + program, 0, sem="acquire", scope="sys")
            while seen - epoch < 0:  # wrapping int32 difference: right across the counter's overflow
                seen = tl.atomic_add(own_flags + peer * GRID + program, 0, sem="acquire", scope="sys")
    tl.debug_barrier()  # every thread reads the peers' data after the flags were seen
    staging = tl.load(staging_ptrs + RANK).to(tl.pointer_type(dtype)) + half
    for unit in range(program, num_units, GRID):
        offsets = unit * unit_size + cols
        mask = (cols < unit_size) & (offsets < n)
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for peer in tl.static_range(WORLD):
            if peer == RANK:
                total += tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            else:  # written over NVLink: read past the (incoherent) L1
                source = staging + peer * slot_elements + offsets
                total += tl.load(source, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        reduced = total.to(dtype)
        if FUSE_NORM:  # the arithmetic of rms_norm.py's fused kernel, on the reduced row
            residual = tl.load(residual_ptr + offsets, mask=mask, other=0.0)
            summed = (reduced.to(tl.float32) + residual.to(tl.float32)).to(dtype)
            tl.store(residual_out_ptr + offsets, summed, mask=mask)
            hidden = summed.to(tl.float32)
            variance = tl.sum(hidden * hidden, axis=0) / unit_size
            weight = tl.load(weight_ptr + cols, mask=cols < unit_size, other=0.0)
            if UNIT_OFFSET:
                out = hidden * tl.rsqrt(variance + eps) * (1.0 + weight.to(tl.float32))
            else:
                normed = (hidden * tl.rsqrt(variance + eps)).to(dtype)
                out = weight.to(tl.float32) * normed.to(tl.float32)
            tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(x_ptr + offsets, reduced, mask=mask)


def _check_fits(x: torch.Tensor, buffers: PeerBuffers) -> None:
    if x.numel() * x.element_size() > buffers.slot_bytes or not x.is_contiguous():
        raise ValueError(f"one_shot_all_reduce takes a contiguous tensor of at most {buffers.slot_bytes} bytes, "
                         f"got {tuple(x.shape)} of {x.numel() * x.element_size()} bytes")


def one_shot_all_reduce(x: torch.Tensor, buffers: PeerBuffers) -> None:
    """Sum ``x`` (contiguous, at most ``buffers.slot_bytes``) over the ranks in place."""
    _check_fits(x, buffers)
    _one_shot_all_reduce_kernel[(GRID,)](
        x, x, x, x, x, x.numel(), BLOCK, 0.0, buffers.staging_ptrs, buffers.flag_ptrs, buffers.epochs,
        buffers.slot_bytes // x.element_size(),
        RANK=buffers.rank, WORLD=buffers.world, GRID=GRID, BLOCK=BLOCK, FUSE_NORM=False, UNIT_OFFSET=False,
        num_warps=4,
    )


def one_shot_all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                                     unit_offset: bool, buffers: PeerBuffers) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(all_reduce(x) + residual), all_reduce(x) + residual)`` for ``x [rows, hidden]``; ``x`` itself
    is left as it was. Bit for bit ``one_shot_all_reduce`` then ``rms_norm.fused_add_rms_norm``."""
    _check_fits(x, buffers)
    if x.dim() != 2 or residual.shape != x.shape or residual.dtype != x.dtype or not residual.is_contiguous():
        raise ValueError(f"residual must be contiguous and match x [rows, hidden]: {tuple(residual.shape)} "
                         f"{residual.dtype} vs {tuple(x.shape)} {x.dtype}")
    if weight.shape != x.shape[1:] or x.shape[1] > MAX_HIDDEN:
        raise ValueError(f"weight must be [hidden] with hidden <= {MAX_HIDDEN}, got {tuple(weight.shape)} for x "
                         f"{tuple(x.shape)}")
    out_dtype = x.dtype if unit_offset else torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    residual_out = torch.empty_like(x)
    block = triton.next_power_of_2(x.shape[1])
    _one_shot_all_reduce_kernel[(GRID,)](
        x, residual, weight, out, residual_out, x.numel(), x.shape[1], eps, buffers.staging_ptrs,
        buffers.flag_ptrs, buffers.epochs, buffers.slot_bytes // x.element_size(),
        RANK=buffers.rank, WORLD=buffers.world, GRID=GRID, BLOCK=block, FUSE_NORM=True, UNIT_OFFSET=unit_offset,
        num_warps=min(max(block // 256, 1), 16),  # rms_norm.py's: the same reduction order, the same bits
    )
    return out, residual_out
