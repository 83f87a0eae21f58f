"""RMSNorm, alone and fused with the residual add that precedes it in every decoder layer.

Matches HF's ``LlamaRMSNorm``/``Qwen2RMSNorm`` rounding exactly: normalise in float32, round to the input dtype,
then multiply by the weight (in the weight's and input's promoted dtype). With ``unit_offset`` it is Gemma's
instead: the weight is stored as an offset from 1, and ``normed * (1 + weight)`` is computed in float32 and rounded
once, to the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_minivllm.kernels.launch import launch


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """Reference: HF's RMSNorm forward (Gemma's with ``unit_offset``)."""
    hidden = x.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (hidden * (1.0 + weight.to(torch.float32))).to(x.dtype)
    return weight * hidden.to(x.dtype)


def fused_add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                             unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``residual_out = x + residual`` (model dtype), ``normed = rms_norm(residual_out)``."""
    residual_out = x + residual
    return rms_norm_torch(residual_out, weight, eps, unit_offset), residual_out


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    x_row_stride, residual_row_stride, out_row_stride, residual_out_row_stride,
    hidden_size, eps,
    HAS_RESIDUAL: tl.constexpr, UNIT_OFFSET: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * residual_out_row_stride + cols, x, mask=mask)
    hidden = x.to(tl.float32)
    variance = tl.sum(hidden * hidden, axis=0) / hidden_size
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    if UNIT_OFFSET:
        out = hidden * tl.rsqrt(variance + eps) * (1.0 + weight.to(tl.float32))
    else:
        normed = (hidden * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)
        out = weight.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            unit_offset: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if x.dim() != 2 or x.stride(1) != 1 or weight.shape != x.shape[1:]:
        raise ValueError(f"rms_norm takes x [tokens, hidden] contiguous in hidden and weight [hidden], "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    num_rows, hidden_size = x.shape
    out_dtype = x.dtype if unit_offset else torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    residual_out = torch.empty_like(x) if residual is not None else None
    if num_rows == 0:
        return out, residual_out
    block = triton.next_power_of_2(hidden_size)
    launch(_rms_norm_kernel, (num_rows,),
        x, residual if residual is not None else x, weight, out, residual_out if residual_out is not None else out,
        x.stride(0), residual.stride(0) if residual is not None else 0,
        out.stride(0), residual_out.stride(0) if residual_out is not None else 0,
        hidden_size, eps,
        HAS_RESIDUAL=residual is not None, UNIT_OFFSET=unit_offset, BLOCK=block, num_warps=min(max(block // 256, 1), 16),
    )
    return out, residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """Triton RMSNorm of ``x [tokens, hidden]``: one program per row."""
    return _launch(x, None, weight, eps, unit_offset)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``(rms_norm(x + residual), x + residual)`` in one pass over memory."""
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1:
        raise ValueError(f"residual must match x: {tuple(residual.shape)} {residual.dtype} vs {tuple(x.shape)} {x.dtype}")
    normed, residual_out = _launch(x, residual, weight, eps, unit_offset)
    return normed, residual_out
