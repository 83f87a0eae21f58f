"""Writing a step's new keys and values into the paged KV cache.

Cache layout (see ``hf_minivllm.layers.context``): ``[num_blocks, block_size, num_kv_heads, head_dim]``, so one
token's slot is ``num_kv_heads * head_dim`` contiguous elements at ``slot * num_kv_heads * head_dim``.
A slot of -1 marks a padding row (CUDA-graph batches are padded) whose K/V must not be written.

An FP8 cache (``torch.float8_e4m3fn``) holds ``x / scale`` saturated to e4m3's range, one scale for a layer's keys
and one for its values (``kv_scales [2]`` float32, on the cache's device): a key is read back as
``stored * kv_scales[0]``. The attention kernels read such a cache directly, folding the key scale into the score
scale and the value scale into the output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hf_minivllm.kernels.launch import launch


FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` saturated to e4m3's range, as e4m3 (the torch path's store, and the tests' reference)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize(cache_values: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Cache values as ``dtype``: an FP8 cache's times its scale (``scale`` None: a plain cache, just cast)."""
    if scale is None:
        return cache_values.to(dtype)
    return (cache_values.float() * scale).to(dtype)


def check_kv_scales(cache: torch.Tensor, kv_scales: torch.Tensor | None) -> None:
    """An FP8 cache needs its scales, a plain cache has none."""
    if (cache.dtype == FP8_DTYPE) != (kv_scales is not None):
        raise ValueError(f"kv_scales must be given for an FP8 cache and only then (cache dtype {cache.dtype}, "
                         f"kv_scales {'given' if kv_scales is not None else 'None'})")
    if kv_scales is not None and (kv_scales.shape != (2,) or kv_scales.dtype != torch.float32
                                  or kv_scales.device != cache.device):
        raise ValueError(f"kv_scales must be a float32 [2] tensor (key scale, value scale) on {cache.device}, got "
                         f"{kv_scales.dtype} {tuple(kv_scales.shape)} on {kv_scales.device}")


@dataclass
class KVCacheWrite:
    """Where a step's keys and values go: a layer's full-precision caches and one slot per token (-1: not written),
    for a kernel that produces the keys to write them as it goes (``hf_minivllm.kernels.rotary``)."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor


def check_store_inputs(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """Keys and values ``[tokens, kv_heads, head_dim]`` that fit the caches, one slot per token."""
    if key.shape != value.shape or key.dim() != 3:
        raise ValueError(f"key and value must both be [tokens, kv_heads, head_dim], got {tuple(key.shape)} and {tuple(value.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.shape[2:] != key.shape[1:]:
        raise ValueError(f"caches {tuple(k_cache.shape)} do not match key {tuple(key.shape)}")
    if slot_mapping.shape != key.shape[:1]:
        raise ValueError(f"slot_mapping must hold one slot per token, got {tuple(slot_mapping.shape)} for {key.shape[0]} tokens")


def store_kvcache_torch(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, kv_scales: torch.Tensor | None = None) -> None:
    """Reference (and CPU path): scatter each token's K/V row into its slot, skipping slots of -1 (quantized with
    ``kv_scales`` into an FP8 cache)."""
    check_store_inputs(key, value, k_cache, v_cache, slot_mapping)
    check_kv_scales(k_cache, kv_scales)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    key, value = key[keep], value[keep]
    if kv_scales is not None:
        key, value = quantize_fp8(key, kv_scales[0]), quantize_fp8(value, kv_scales[1])
    k_cache.view(-1, *k_cache.shape[2:])[slots] = key.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = value.to(v_cache.dtype)


@triton.jit
def _round_to_e4m3_magnitude(magnitude):
    """``magnitude`` (float32, 0 to FP8_MAX, or NaN) rounded to the nearest e4m3 value, ties to even, in float32
    arithmetic, so that the cast after it is exact: the GPU, torch and the interpreter (whose own rounding does not
    carry into the exponent: 124.5 became 64) then store the same bytes. Normal values keep 3 of float32's 23
    mantissa bits; below e4m3's smallest normal (2**-6) the step is 2**-9, which adding and subtracting 1.5 * 2**14
    rounds to. NaN stays NaN: the normal path would carry a NaN's mantissa (sm_90's canonical NaN is 0x7FFFFFFF)
    into the exponent and beyond."""
    bits = magnitude.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    subnormal = (magnitude + 24576.0) - 24576.0
    rounded = tl.where(magnitude < 0.015625, subnormal, normal)
    return tl.where(magnitude != magnitude, magnitude, rounded)


@triton.jit
def _quantize_e4m3(x, scale, FP8_MAX: tl.constexpr):
    """``x / scale`` (IEEE division, as torch's; Triton's ``/`` is approximate) saturated to e4m3's range with NaN
    kept NaN (as torch's clamp does) and rounded (``_round_to_e4m3_magnitude``), as e4m3. The magnitude is rounded
    and the sign bit set on the byte: Triton 3.6 compiles a negation for sm_90 as ``0 - x``, which turns -0 (what a
    small negative value rounds to, and what torch stores) into +0."""
    scaled = tl.clamp(tl.math.div_rn(x.to(tl.float32), scale), -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    stored = _round_to_e4m3_magnitude(tl.abs(scaled)).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    sign = tl.where(scaled.to(tl.int32, bitcast=True) < 0, 0x80, 0).to(tl.uint8)
    return (stored | sign).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _store_kvcache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, kv_scales_ptr,
    key_token_stride, key_head_stride, value_token_stride, value_head_stride,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_DIM: tl.constexpr,
    FP8: tl.constexpr, FP8_MAX: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        heads = tl.arange(0, BLOCK_HEADS)[:, None]
        dims = tl.arange(0, BLOCK_DIM)[None, :]
        mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
        token64 = token.to(tl.int64)
        key = tl.load(key_ptr + token64 * key_token_stride + heads * key_head_stride + dims, mask=mask)
        value = tl.load(value_ptr + token64 * value_token_stride + heads * value_head_stride + dims, mask=mask)
        if FP8:
            key = _quantize_e4m3(key, tl.load(kv_scales_ptr), FP8_MAX)
            value = _quantize_e4m3(value, tl.load(kv_scales_ptr + 1), FP8_MAX)
        cache_offsets = slot * (NUM_KV_HEADS * HEAD_DIM) + heads * HEAD_DIM + dims
        tl.store(k_cache_ptr + cache_offsets, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + cache_offsets, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, kv_scales: torch.Tensor | None = None) -> None:
    """Triton: one program per token writes its ``[kv_heads, head_dim]`` K and V rows into ``slot_mapping[t]``
    (quantized with ``kv_scales`` into an FP8 cache).

    ``key``/``value`` may be strided views (e.g. slices of a fused qkv projection) as long as ``head_dim`` is
    contiguous; the caches must be contiguous. Graph-capturable: no host synchronisation.
    """
    check_store_inputs(key, value, k_cache, v_cache, slot_mapping)
    check_kv_scales(k_cache, kv_scales)
    if key.stride(2) != 1 or value.stride(2) != 1:
        raise ValueError("key and value must be contiguous along head_dim")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    launch(_store_kvcache_kernel, (num_tokens,),
        key, value, k_cache, v_cache, slot_mapping, kv_scales if kv_scales is not None else slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_HEADS=triton.next_power_of_2(num_kv_heads), BLOCK_DIM=triton.next_power_of_2(head_dim),
        FP8=kv_scales is not None, FP8_MAX=FP8_MAX,
    )
