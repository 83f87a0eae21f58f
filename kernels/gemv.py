"""Projections of a few rows (decode at small batches): ``x W^T (+ b)``, and the gated MLP's ``silu(x Wg^T) * (x Wu^T)``
in one pass over the fused ``[gate | up]`` weight.

At batch 1 a decode step is mostly reading weights, and cuBLAS reads them at 0.4-1.1 TB/s for the 0.6B
architecture's projections (H100, 9252a42), a third of the memory's speed: its kernels for one row launch too few
blocks for matrices of a few MB. Here each program owns ``BLOCK_N`` output features and reads their weight rows
once for all ``M <= MAX_ROWS`` input rows, accumulating in float32, so a matrix is spread over hundreds of programs.

Rounding follows the unfused ops: one rounding of ``acc + bias`` to the output dtype (as ``F.linear``), and in the
gated form gate and up are rounded first, then ``silu(gate)`` is rounded before the product (as ``SiluAndMul``).
The sums run in a different order than cuBLAS's, so results agree to the dtype's rounding, not bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hf_minivllm.kernels.launch import launch

MAX_ROWS = 8  # above this a tile of tensor-core GEMM (cuBLAS) reads each weight once for more rows


def gemv_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: ``F.linear``."""
    return F.linear(x, weight, bias)


def gemv_silu_mul_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: the fused ``[gate | up]`` projection, then ``silu(gate) * up`` (HF's gated MLP)."""
    gate, up = F.linear(x, weight, bias).chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, num_rows, out_features, in_features, x_stride, w_stride,
                 out_stride, gate_offset,
                 HAS_BIAS: tl.constexpr, GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    features = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    feature_mask = features < out_features
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    w_rows = w_ptr + features.to(tl.int64)[:, None] * w_stride
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    if GATED:
        up_rows = w_rows + gate_offset * w_stride
        acc_up = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for start in range(0, in_features, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_mask = cols < in_features
        x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                    other=0.0).to(tl.float32)[:, None, :]
        w_mask = feature_mask[:, None] & col_mask[None, :]
        w = tl.load(w_rows + cols[None, :], mask=w_mask, other=0.0, eviction_policy="evict_first")
        acc += x * w.to(tl.float32)[None, :, :]
        if GATED:
            w_up = tl.load(up_rows + cols[None, :], mask=w_mask, other=0.0, eviction_policy="evict_first")
            acc_up += x * w_up.to(tl.float32)[None, :, :]
    out_dtype = out_ptr.dtype.element_ty
    y = tl.sum(acc, axis=2)
    if HAS_BIAS:
        y += tl.load(bias_ptr + features, mask=feature_mask, other=0.0).to(tl.float32)[None, :]
    y = y.to(out_dtype)
    if GATED:
        up = tl.sum(acc_up, axis=2)
        if HAS_BIAS:
            up += tl.load(bias_ptr + gate_offset + features, mask=feature_mask, other=0.0).to(tl.float32)[None, :]
        gate = y.to(tl.float32)
        activated = (gate / (1.0 + tl.exp(-gate))).to(out_dtype).to(tl.float32)
        y = (activated * up.to(out_dtype).to(tl.float32)).to(out_dtype)
    tl.store(out_ptr + rows[:, None] * out_stride + features[None, :], y,
             mask=row_mask[:, None] & feature_mask[None, :])


def _tiles(num_rows: int, out_features: int, in_features: int, gated: bool) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K)``: enough programs to fill the GPU (at least ~1,000 where the features allow),
    and an accumulator of at most 2,048 float32 per program (per weight read) so that many programs fit per SM."""
    block_m = max(triton.next_power_of_2(num_rows), 1)
    block_k = min(triton.next_power_of_2(in_features), 512)
    block_n = 8
    while block_n > 1 and triton.cdiv(out_features, block_n) < 1024:
        block_n //= 2
    budget = 1024 if gated else 2048
    while block_m * block_n * block_k > budget and block_k > 64:
        block_k //= 2
    while block_m * block_n * block_k > budget and block_n > 1:
        block_n //= 2
    return block_m, block_n, block_k


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> None:
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


def _gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool) -> torch.Tensor:
    out_features = weight.shape[0] // 2 if gated else weight.shape[0]
    _check(x, weight, bias, out_features)
    if gated and weight.shape[0] % 2:
        raise ValueError(f"gemv_silu_mul takes a fused [gate | up] weight of even rows, got {weight.shape[0]}")
    out = torch.empty(x.shape[0], out_features, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    block_m, block_n, block_k = _tiles(x.shape[0], out_features, x.shape[1], gated)
    launch(_gemv_kernel, (triton.cdiv(out_features, block_n),),
           x, weight, bias if bias is not None else weight, out, x.shape[0], out_features, x.shape[1],
           x.stride(0), weight.stride(0), out.stride(0), out_features,
           HAS_BIAS=bias is not None, GATED=gated, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton ``F.linear(x, weight, bias)`` for ``x [rows <= MAX_ROWS, in_features]``."""
    return _gemv(x, weight, bias, gated=False)


def gemv_silu_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton ``silu(gate) * up`` of ``F.linear(x, weight, bias) = [gate | up]``, without writing the projection."""
    return _gemv(x, weight, bias, gated=True)
