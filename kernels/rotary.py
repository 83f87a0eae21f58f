"""Rotary position embedding applied in place to q and k in one launch, optionally after Qwen3's per-head RMSNorm.

At batch-1 decode a step is bound by the number of kernels it launches; the torch path spends about ten small
kernels per layer on RoPE (two more on the q/k norms). Here one program rotates a block of heads of one token,
and the grid covers every (token, q-or-k head block), so a layer's q/k norm + RoPE is a single launch (with a cache
write, the grid also covers the value head blocks).

Conventions are HF's: ``out = x * cos + rotate_half(x) * sin`` with the half-width ``[cos | sin]`` cache rows of
``hf_minivllm.layers.rotary.RotaryEmbedding`` (already rounded to the model dtype). HF computes this in the model
dtype, rounding every product and every sum; the kernel repeats each of those roundings (products in fp32, then
rounded to the dtype, then the sum), so its result is bit-identical to the torch path (tests: fp32/fp16 under the
interpreter, bf16 on GPU) rather than the slightly more accurate single rounding. FMA contraction is disabled for the same reason (an fp32 ``a*b - c``
fused into one FMA rounds differently from torch's two ops). The RMSNorm is HF's too: normalise in fp32, round to
the dtype, multiply by the weight; only its sum of squares is reduced in a different order than torch's.

q and k are ``[tokens, heads * head_dim]`` or ``[tokens, heads, head_dim]``, typically strided views into the fused
qkv projection's output; only the last dimension must be contiguous. The head sizes are the attention kernels'
(``paged_inputs.HEAD_DIM_RULE``, Phi-3-mini's 96 included), so a model on those kernels gets this launch too. A half
head that is not a power of two spans the next power of two's lanes (``HALF_PADDED``: Triton's ranges are powers of
two), those past it masked (behind the ``PADDED`` flag: a power-of-two head compiles as it did without padding).

Given a ``KVCacheWrite`` and the values, the same launch also writes each token's rotated keys and its values into
a full-precision paged cache (``hf_minivllm.kernels.kv_cache``'s layout, the store kernel's bytes): the attention
layer then has no store kernel to launch, one launch fewer per layer and step. An FP8 cache keeps the store kernel:
its quantization written from this kernel's registers stored wrong bytes on an H200 (Triton 3.6; right under the
interpreter).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_minivllm.kernels.kv_cache import FP8_DTYPE, KVCacheWrite, check_store_inputs, store_kvcache_torch
from hf_minivllm.kernels.launch import launch
from hf_minivllm.kernels.paged_inputs import HEAD_DIM_RULE, kernels_take_head_dim, padded_head_dim

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
def _load_half(ptr, cols, HALF: tl.constexpr, PADDED: tl.constexpr):
    """A half-head vector (cos, sin, half a norm weight) at lanes ``cols``; on a ``PADDED`` head the lanes past
    ``HALF`` read 0 (they would read the next half, or past the tensor). A power-of-two head's loads stay unmasked."""
    if PADDED:
        x = tl.load(ptr + cols, mask=cols < HALF, other=0.0)
    else:
        x = tl.load(ptr + cols)
    return x


@triton.jit
def _norm_rotate_heads(
    rows_ptr, first_head, num_heads, head_stride, weight_ptr, cos, sin, eps, cache_ptr, slot,
    HALF: tl.constexpr, HALF_PADDED: tl.constexpr, PADDED: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_NORM: tl.constexpr, STORE: tl.constexpr,
):
    """Heads ``first_head .. first_head + BLOCK_H`` of one token of one tensor: optional RMSNorm, then RoPE; with
    ``STORE`` the result also goes to the cache row ``slot`` (none when it is -1). The lanes past ``HALF`` (a padded
    head's) load 0, so they add nothing to the sum of squares, and are never stored."""
    heads = first_head + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, HALF_PADDED)
    offsets = heads[:, None].to(tl.int64) * head_stride + cols[None, :]
    # The lane term is all true on a power-of-two head (whose loads and stores compile as before padding).
    mask = (heads[:, None] < num_heads) & (cols[None, :] < HALF)
    x1 = tl.load(rows_ptr + offsets, mask=mask, other=0.0)
    x2 = tl.load(rows_ptr + offsets + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    if HAS_NORM:
        variance = (tl.sum(a1 * a1, axis=1) + tl.sum(a2 * a2, axis=1)) / (2 * HALF)
        inv_rms = tl.rsqrt(variance + eps)[:, None]
        w1 = _load_half(weight_ptr, cols, HALF, PADDED).to(tl.float32)[None, :]
        w2 = _load_half(weight_ptr + HALF, cols, HALF, PADDED).to(tl.float32)[None, :]
        a1 = (w1 * (a1 * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        a2 = (w2 * (a2 * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    # Each product and each sum rounded to the dtype, as the torch path (HF) computes them.
    out1 = ((a1 * cos).to(dtype).to(tl.float32) - (a2 * sin).to(dtype).to(tl.float32)).to(dtype)
    out2 = ((a2 * cos).to(dtype).to(tl.float32) + (a1 * sin).to(dtype).to(tl.float32)).to(dtype)
    tl.store(rows_ptr + offsets, out1, mask=mask)
    tl.store(rows_ptr + offsets + HALF, out2, mask=mask)
    if STORE:
        if slot >= 0:
            cache_offsets = slot * (num_heads * 2 * HALF) + heads[:, None] * (2 * HALF) + cols[None, :]
            tl.store(cache_ptr + cache_offsets, out1, mask=mask)
            tl.store(cache_ptr + cache_offsets + HALF, out2, mask=mask)


@triton.jit
def _copy_heads_to_cache(
    rows_ptr, first_head, num_heads, head_stride, cache_ptr, slot, HALF: tl.constexpr, HALF_PADDED: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Heads ``first_head .. first_head + BLOCK_H`` of one token's values, into the cache row ``slot``."""
    heads = first_head + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, 2 * HALF_PADDED)
    mask = (heads[:, None] < num_heads) & (cols[None, :] < 2 * HALF)  # lanes: all true on a power-of-two head
    x = tl.load(rows_ptr + heads[:, None].to(tl.int64) * head_stride + cols[None, :], mask=mask)
    cache_offsets = slot * (num_heads * 2 * HALF) + heads[:, None] * (2 * HALF) + cols[None, :]
    tl.store(cache_ptr + cache_offsets, x, mask=mask)


@triton.jit
def _qk_rotary_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, cos_sin_ptr, q_weight_ptr, k_weight_ptr,
    k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    q_token_stride, q_head_stride, k_token_stride, k_head_stride, v_token_stride, v_head_stride, cos_sin_stride,
    num_q_heads, num_k_heads, num_q_blocks, num_k_blocks, eps,
    HALF: tl.constexpr, HALF_PADDED: tl.constexpr, PADDED: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_NORM: tl.constexpr, STORE: tl.constexpr,
):
    """Grid ``(tokens, q head blocks + k head blocks [+ v head blocks with STORE])``: each program rotates one block
    of q or of k heads, or (with ``STORE``) writes one block of v heads to the cache."""
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    if STORE:
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    else:
        slot = -1
    if head_block >= num_q_blocks + num_k_blocks:
        if slot >= 0:
            _copy_heads_to_cache(v_ptr + token * v_token_stride, (head_block - num_q_blocks - num_k_blocks) * BLOCK_H,
                                 num_k_heads, v_head_stride, v_cache_ptr, slot, HALF, HALF_PADDED, BLOCK_H)
    else:
        cols = tl.arange(0, HALF_PADDED)
        cos_sin_row = cos_sin_ptr + tl.load(positions_ptr + token).to(tl.int64) * cos_sin_stride
        cos = _load_half(cos_sin_row, cols, HALF, PADDED).to(tl.float32)[None, :]
        sin = _load_half(cos_sin_row + HALF, cols, HALF, PADDED).to(tl.float32)[None, :]
        if head_block < num_q_blocks:
            _norm_rotate_heads(q_ptr + token * q_token_stride, head_block * BLOCK_H, num_q_heads, q_head_stride,
                               q_weight_ptr, cos, sin, eps, k_cache_ptr, slot, HALF, HALF_PADDED, PADDED, BLOCK_H,
                               HAS_NORM, False)
        else:
            _norm_rotate_heads(k_ptr + token * k_token_stride, (head_block - num_q_blocks) * BLOCK_H, num_k_heads,
                               k_head_stride, k_weight_ptr, cos, sin, eps, k_cache_ptr, slot, HALF, HALF_PADDED,
                               PADDED, BLOCK_H, HAS_NORM, STORE)


def _check_write(k_heads: torch.Tensor, v: torch.Tensor | None, write: KVCacheWrite | None) -> torch.Tensor | None:
    """``v`` as ``[tokens, kv_heads, head_dim]`` when there is a cache write (the two come together)."""
    if (v is None) != (write is None):
        raise ValueError("v and write must be given together (the values go to the cache with the keys)")
    if write is None:
        return None
    v_heads = _as_heads(v, k_heads.shape[2])
    check_store_inputs(k_heads, v_heads, write.k_cache, write.v_cache, write.slot_mapping)
    if write.k_cache.dtype == FP8_DTYPE:
        raise ValueError("the rotary kernel writes full-precision caches only: an FP8 cache takes store_kvcache")
    if v_heads.stride(2) != 1 or not (write.k_cache.is_contiguous() and write.v_cache.is_contiguous()):
        raise ValueError("v must be contiguous along head_dim, the caches entirely")
    if not write.k_cache.dtype == write.v_cache.dtype == k_heads.dtype:
        raise ValueError(f"a {write.k_cache.dtype} cache takes {write.k_cache.dtype} keys, got {k_heads.dtype}")
    return v_heads


def _launch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
            weights: tuple[torch.Tensor, torch.Tensor] | None, eps: float, v: torch.Tensor | None,
            write: KVCacheWrite | None) -> None:
    head_dim = cos_sin_cache.shape[1]
    if not kernels_take_head_dim(head_dim):
        raise ValueError(f"the rotary kernel needs {HEAD_DIM_RULE}, got head_dim {head_dim}")
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
    v_heads = _check_write(k_heads, v, write)
    if num_tokens == 0:
        return
    num_q_heads, num_k_heads = q_heads.shape[1], k_heads.shape[1]
    padded = padded_head_dim(head_dim)
    block_h = min(triton.next_power_of_2(max(num_q_heads, num_k_heads)), max(_ELEMENTS_PER_PROGRAM // padded, 1))
    num_q_blocks, num_k_blocks = triton.cdiv(num_q_heads, block_h), triton.cdiv(num_k_heads, block_h)
    grid = (num_tokens, num_q_blocks + num_k_blocks * (2 if write is not None else 1))
    q_weight, k_weight = weights if weights is not None else (q_heads, k_heads)
    # Without a write, its pointers are placeholders of the right kind, never read.
    v_heads = v_heads if v_heads is not None else k_heads
    k_cache, v_cache, slot_mapping = ((write.k_cache, write.v_cache, write.slot_mapping) if write is not None
                                      else (q, q, positions))
    # PADDED repeats HALF != HALF_PADDED as a flag, so that tests/kernel_variants.py compiles both of its values.
    launch(_qk_rotary_kernel, grid,
        q_heads, k_heads, v_heads, positions, cos_sin_cache, q_weight, k_weight,
        k_cache, v_cache, slot_mapping,
        q_heads.stride(0), q_heads.stride(1), k_heads.stride(0), k_heads.stride(1),
        v_heads.stride(0), v_heads.stride(1), cos_sin_cache.stride(0),
        num_q_heads, num_k_heads, num_q_blocks, num_k_blocks, eps,
        HALF=head_dim // 2, HALF_PADDED=padded // 2, PADDED=padded != head_dim, BLOCK_H=block_h,
        HAS_NORM=weights is not None, STORE=write is not None, num_warps=min(max(block_h * padded // 256, 1), 4),
        enable_fp_fusion=False,
    )


def apply_rotary_inplace(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                         v: torch.Tensor | None = None, write: KVCacheWrite | None = None) -> None:
    """Triton RoPE of ``q`` and ``k`` in place, one launch; ``cos_sin_cache`` is ``[max_positions, head_dim]``.
    With ``v`` and ``write`` the rotated keys and the values also go to the cache."""
    _launch(q, k, positions, cos_sin_cache, None, 0.0, v, write)


def qk_norm_rotary_inplace(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                           eps: float, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                           v: torch.Tensor | None = None, write: KVCacheWrite | None = None) -> None:
    """Triton per-head RMSNorm (``q_weight``/``k_weight``: ``[head_dim]``) then RoPE of ``q`` and ``k``, in place.
    With ``v`` and ``write`` the rotated keys and the values also go to the cache."""
    _launch(q, k, positions, cos_sin_cache, (q_weight, k_weight), eps, v, write)


def write_to_cache_torch(k: torch.Tensor, v: torch.Tensor, write: KVCacheWrite) -> None:
    """Reference for the write: the rotated ``k`` and ``v`` stored as ``store_kvcache_torch`` stores them."""
    head_dim = write.k_cache.shape[-1]
    store_kvcache_torch(_as_heads(k, head_dim), _as_heads(v, head_dim), write.k_cache, write.v_cache,
                        write.slot_mapping)
