"""Rotary position embedding applied in place to q and k in one launch, optionally after Qwen3's per-head RMSNorm.

At batch-1 decode a step is bound by the number of kernels it launches; the torch path spends about ten small
kernels per layer on RoPE (two more on the q/k norms). Here one program rotates a block of heads of one token,
and the grid covers every (token, q-or-k head block), so a layer's q/k norm + RoPE is a single launch.

Conventions are HF's: ``out = x * cos + rotate_half(x) * sin`` with the half-width ``[cos | sin]`` cache rows of
``hf_minivllm.layers.rotary.RotaryEmbedding`` (already rounded to the model dtype). HF computes this in the model
dtype, rounding every product and every sum; the kernel repeats each of those roundings (products in fp32, then
rounded to the dtype, then the sum), so its result is bit-identical to the torch path (tests: fp32/fp16 under the
interpreter, bf16 on GPU) rather than the slightly more accurate single rounding. FMA contraction is disabled for the same reason (an fp32 ``a*b - c``
fused into one FMA rounds differently from torch's two ops). The RMSNorm is HF's too: normalise in fp32, round to
the dtype, multiply by the weight; only its sum of squares is reduced in a different order than torch's.

q and k are ``[tokens, heads * head_dim]`` or ``[tokens, heads, head_dim]``, typically strided views into the fused
qkv projection's output; only the last dimension must be contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_minivllm.kernels.launch import launch

# Elements per program: enough work per program for prefill, few enough programs to stay one wave at decode.
_ELEMENTS_PER_PROGRAM = 1024


def _as_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[T, H*D]`` or ``[T, H, D]`` as a ``[T, H, D]`` view (no copy: the caller's storage is what gets rotated)."""
    return x.view(x.shape[0], x.shape[1] // head_dim, head_dim) if x.dim() == 2 else x


def _rotate_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    hidden = x.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(x.dtype)


def apply_rotary_inplace_torch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                               cos_sin_cache: torch.Tensor) -> None:
    """Reference: HF's RoPE on ``q`` and ``k``, written back into them."""
    head_dim = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    for x in (_as_heads(q, head_dim), _as_heads(k, head_dim)):
        x.copy_(_rotate_torch(x, cos, sin))


def qk_norm_rotary_inplace_torch(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                                 eps: float, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Reference: HF's per-head RMSNorm of ``q`` and ``k`` (Qwen3's q_norm/k_norm), then RoPE, written back."""
    head_dim = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    for x, weight in ((_as_heads(q, head_dim), q_weight), (_as_heads(k, head_dim), k_weight)):
        x.copy_(_rotate_torch(_rms_norm_torch(x, weight, eps), cos, sin))


@triton.jit
def _norm_rotate_heads(
    rows_ptr, first_head, num_heads, head_stride, weight_ptr, cos, sin, eps,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, HAS_NORM: tl.constexpr,
):
    """Heads ``first_head .. first_head + BLOCK_H`` of one token of one tensor: optional RMSNorm, then RoPE."""
    heads = first_head + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, HALF)
    offsets = heads[:, None].to(tl.int64) * head_stride + cols[None, :]
    mask = (heads[:, None] < num_heads) & (cols[None, :] < HALF)
    x1 = tl.load(rows_ptr + offsets, mask=mask, other=0.0)
    x2 = tl.load(rows_ptr + offsets + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    if HAS_NORM:
        variance = (tl.sum(a1 * a1, axis=1) + tl.sum(a2 * a2, axis=1)) / (2 * HALF)
        inv_rms = tl.rsqrt(variance + eps)[:, None]
        w1 = tl.load(weight_ptr + cols).to(tl.float32)[None, :]
        w2 = tl.load(weight_ptr + HALF + cols).to(tl.float32)[None, :]
        a1 = (w1 * (a1 * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        a2 = (w2 * (a2 * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    # Each product and each sum rounded to the dtype, as the torch path (HF) computes them.
    out1 = (a1 * cos).to(dtype).to(tl.float32) - (a2 * sin).to(dtype).to(tl.float32)
    out2 = (a2 * cos).to(dtype).to(tl.float32) + (a1 * sin).to(dtype).to(tl.float32)
    tl.store(rows_ptr + offsets, out1.to(dtype), mask=mask)
    tl.store(rows_ptr + offsets + HALF, out2.to(dtype), mask=mask)


@triton.jit
def _qk_rotary_kernel(
    q_ptr, k_ptr, positions_ptr, cos_sin_ptr, q_weight_ptr, k_weight_ptr,
    q_token_stride, q_head_stride, k_token_stride, k_head_stride, cos_sin_stride,
    num_q_heads, num_k_heads, num_q_blocks, eps,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, HAS_NORM: tl.constexpr,
):
    """Grid ``(tokens, q head blocks + k head blocks)``: each program rotates one block of q or of k heads."""
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    cols = tl.arange(0, HALF)
    cos_sin_row = cos_sin_ptr + tl.load(positions_ptr + token).to(tl.int64) * cos_sin_stride
    cos = tl.load(cos_sin_row + cols).to(tl.float32)[None, :]
    sin = tl.load(cos_sin_row + HALF + cols).to(tl.float32)[None, :]
    if head_block < num_q_blocks:
        _norm_rotate_heads(q_ptr + token * q_token_stride, head_block * BLOCK_H, num_q_heads, q_head_stride,
                           q_weight_ptr, cos, sin, eps, HALF, BLOCK_H, HAS_NORM)
    else:
        _norm_rotate_heads(k_ptr + token * k_token_stride, (head_block - num_q_blocks) * BLOCK_H, num_k_heads,
                           k_head_stride, k_weight_ptr, cos, sin, eps, HALF, BLOCK_H, HAS_NORM)


def _launch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
            weights: tuple[torch.Tensor, torch.Tensor] | None, eps: float) -> None:
    head_dim = cos_sin_cache.shape[1]
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"the rotary kernel needs a power-of-two head_dim >= 16, got {head_dim}")
    q_heads, k_heads = _as_heads(q, head_dim), _as_heads(k, head_dim)
    num_tokens = q_heads.shape[0]
    if q_heads.stride(2) != 1 or k_heads.stride(2) != 1 or not cos_sin_cache.is_contiguous():
        raise ValueError("q and k must be contiguous along head_dim, the cos/sin cache entirely")
    if (not q.dtype == k.dtype == cos_sin_cache.dtype or k_heads.shape[0] != num_tokens
            or positions.shape != (num_tokens,) or not positions.is_contiguous()):
        raise ValueError(f"q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}, positions "
                         f"{tuple(positions.shape)} and cache {cos_sin_cache.dtype} must agree in tokens and dtype")
    if weights is not None and any(w.shape != (head_dim,) or w.dtype != q.dtype for w in weights):
        raise ValueError(f"q/k norm weights must be [{head_dim}] in {q.dtype}")
    if num_tokens == 0:
        return
    num_q_heads, num_k_heads = q_heads.shape[1], k_heads.shape[1]
    block_h = min(triton.next_power_of_2(max(num_q_heads, num_k_heads)), max(_ELEMENTS_PER_PROGRAM // head_dim, 1))
    num_q_blocks = triton.cdiv(num_q_heads, block_h)
    grid = (num_tokens, num_q_blocks + triton.cdiv(num_k_heads, block_h))
    q_weight, k_weight = weights if weights is not None else (q_heads, k_heads)
    launch(_qk_rotary_kernel, grid,
        q_heads, k_heads, positions, cos_sin_cache, q_weight, k_weight,
        q_heads.stride(0), q_heads.stride(1), k_heads.stride(0), k_heads.stride(1), cos_sin_cache.stride(0),
        num_q_heads, num_k_heads, num_q_blocks, eps,
        HALF=head_dim // 2, BLOCK_H=block_h, HAS_NORM=weights is not None,
        num_warps=min(max(block_h * head_dim // 256, 1), 4), enable_fp_fusion=False,
    )


def apply_rotary_inplace(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                         cos_sin_cache: torch.Tensor) -> None:
    """Triton RoPE of ``q`` and ``k`` in place, one launch; ``cos_sin_cache`` is ``[max_positions, head_dim]``."""
    _launch(q, k, positions, cos_sin_cache, None, 0.0)


def qk_norm_rotary_inplace(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                           eps: float, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Triton per-head RMSNorm (``q_weight``/``k_weight``: ``[head_dim]``) then RoPE of ``q`` and ``k``, in place."""
    _launch(q, k, positions, cos_sin_cache, (q_weight, k_weight), eps)
