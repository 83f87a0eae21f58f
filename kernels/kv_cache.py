"""Writing a step's new keys and values into the paged KV cache.

Cache layout (see ``hf_minivllm.layers.context``): ``[num_blocks, block_size, num_kv_heads, head_dim]``, so one
token's slot is ``num_kv_heads * head_dim`` contiguous elements at ``slot * num_kv_heads * head_dim``.
A slot of -1 marks a padding row (CUDA-graph batches are padded) whose K/V must not be written.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def _check_inputs(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    if key.shape != value.shape or key.dim() != 3:
        raise ValueError(f"key and value must both be [tokens, kv_heads, head_dim], got {tuple(key.shape)} and {tuple(value.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.shape[2:] != key.shape[1:]:
        raise ValueError(f"caches {tuple(k_cache.shape)} do not match key {tuple(key.shape)}")
    if slot_mapping.shape != key.shape[:1]:
        raise ValueError(f"slot_mapping must hold one slot per token, got {tuple(slot_mapping.shape)} for {key.shape[0]} tokens")


def store_kvcache_torch(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> None:
    """Reference (and CPU path): scatter each token's K/V row into its slot, skipping slots of -1."""
    _check_inputs(key, value, k_cache, v_cache, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = key[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = value[keep].to(v_cache.dtype)


@triton.jit
def _store_kvcache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    key_token_stride, key_head_stride, value_token_stride, value_head_stride,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_DIM: tl.constexpr,
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
        cache_offsets = slot * (NUM_KV_HEADS * HEAD_DIM) + heads * HEAD_DIM + dims
        tl.store(k_cache_ptr + cache_offsets, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + cache_offsets, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """Triton: one program per token writes its ``[kv_heads, head_dim]`` K and V rows into ``slot_mapping[t]``.

    ``key``/``value`` may be strided views (e.g. slices of a fused qkv projection) as long as ``head_dim`` is
    contiguous; the caches must be contiguous. Graph-capturable: no host synchronisation.
    """
    _check_inputs(key, value, k_cache, v_cache, slot_mapping)
    if key.stride(2) != 1 or value.stride(2) != 1:
        raise ValueError("key and value must be contiguous along head_dim")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _store_kvcache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_HEADS=triton.next_power_of_2(num_kv_heads), BLOCK_DIM=triton.next_power_of_2(head_dim),
    )
