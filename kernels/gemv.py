"""Projections of a few rows onto few output features (decode at batch 1): ``x W^T (+ b)``.

cuBLAS's one-row kernels split a matrix over its output features; with few of them and long rows (the 0.6B
architecture's o_proj, 1024 x 2048) they launch too few blocks: 12.7 us for a 4 MB matrix (0.33 TB/s) on an H200,
where this kernel takes 3.6 us. Each program owns ``BLOCK_N`` output features and reads their weight rows once for
all ``M <= MAX_ROWS`` input rows, accumulating in float32. Where cuBLAS already reads at 3-4 TB/s (wide outputs,
several rows) it stays faster; ``hf_minivllm.layers.linear`` picks between them (see ``GEMV_MAX_ROWS`` there).

Rounding is ``F.linear``'s: one rounding of ``acc + bias`` to the output dtype. The sums run in a different order
than cuBLAS's, so results agree to the dtype's rounding, not bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hf_minivllm.kernels.launch import launch

MAX_ROWS = 8  # the accumulator grows with the rows; past a few, cuBLAS's tensor-core tiles win everywhere


def gemv_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: ``F.linear``."""
    return F.linear(x, weight, bias)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, num_rows, out_features, in_features, x_stride, w_stride,
                 out_stride, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    feature_mask = features < out_features
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    w_rows = w_ptr + features.to(tl.int64)[:, None] * w_stride
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for start in range(0, in_features, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_mask = cols < in_features
        x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                    other=0.0).to(tl.float32)[:, None, :]
        w = tl.load(w_rows + cols[None, :], mask=feature_mask[:, None] & col_mask[None, :], other=0.0,
                    eviction_policy="evict_first")
        acc += x * w.to(tl.float32)[None, :, :]
    y = tl.sum(acc, axis=2)
    if HAS_BIAS:
        y += tl.load(bias_ptr + features, mask=feature_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * out_stride + features[None, :], y.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & feature_mask[None, :])


def _tiles(num_rows: int, out_features: int, in_features: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps)``. One row: 1,024-wide steps along K by two warps, and at least
    ~1,000 programs (up to 4 features each): the best tiles of a sweep on an H200 for the shapes the layers send
    here (``bench_kernels.py --gemv-only``). More rows: an accumulator of at most 4,096 float32 per program."""
    block_m = max(triton.next_power_of_2(num_rows), 1)
    block_k = min(triton.next_power_of_2(in_features), 1024 if block_m == 1 else 512)
    block_n = 4
    while block_n > 1 and triton.cdiv(out_features, block_n) < 1024:
        block_n //= 2
    while block_m * block_n * block_k > 4096 and block_k > 64:
        block_k //= 2
    while block_m * block_n * block_k > 4096 and block_n > 1:
        block_n //= 2
    return block_m, block_n, block_k, 2 if block_m == 1 else 4


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or x.shape[0] > MAX_ROWS or x.stride(1) != 1:
        raise ValueError(f"gemv takes x [rows <= {MAX_ROWS}, in_features] contiguous in its last dim, "
                         f"got {tuple(x.shape)} with strides {x.stride()}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.stride(1) != 1:
        raise ValueError(f"gemv takes weight [out_features, {x.shape[1]}] contiguous in its last dim, "
                         f"got {tuple(weight.shape)} with strides {weight.stride()}")
    if weight.dtype != x.dtype:
        raise ValueError(f"gemv takes x and weight of one dtype, got {x.dtype} and {weight.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or not bias.is_contiguous()):
        raise ValueError(f"gemv takes a contiguous bias [{weight.shape[0]}], got {tuple(bias.shape)}")


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton ``F.linear(x, weight, bias)`` for ``x [rows <= MAX_ROWS, in_features]``."""
    _check(x, weight, bias)
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    block_m, block_n, block_k, num_warps = _tiles(x.shape[0], weight.shape[0], x.shape[1])
    launch(_gemv_kernel, (triton.cdiv(weight.shape[0], block_n),),
           x, weight, bias if bias is not None else weight, out, x.shape[0], weight.shape[0], x.shape[1],
           x.stride(0), weight.stride(0), out.stride(0),
           HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    return out
