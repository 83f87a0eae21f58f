"""Attention arithmetic shared by the paged kernels and their torch references: option checks, the sliding-window
rule, dense attention with optional logit soft-capping, and the kernels' soft-cap, K/V tile loads and masks over
heads padded to a power of two."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def check_attention_options(sliding_window: int | None, softcap: float | None) -> None:
    """Raise ValueError for a window or soft-cap no kernel can honour (None disables either)."""
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                       or sliding_window < 1):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive float or None, got {softcap!r}")


def window_start(query_positions: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """The first key position each query sees: HF's sliding-window overlay keeps keys ``k > q - window`` (the
    query itself and the ``window - 1`` keys before it); 0 without a window."""
    if sliding_window is None:
        return torch.zeros_like(query_positions)
    return (query_positions - sliding_window + 1).clamp(min=0)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float,
                    softcap: float | None) -> torch.Tensor:
    """``softmax(scores) @ v`` over the keys ``visible`` (bool, broadcast against ``[..., q_len, k_len]``).

    Without a soft-cap: SDPA, as HF's sdpa attention computes. With one: HF's eager attention step by step
    (``scores * scale``, then ``/ cap``, ``tanh``, ``* cap``, then masking and a float32 softmax rounded back to the
    input dtype), the only HF path that soft-caps on the CPU.
    """
    if softcap is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)


@triton.jit
def lane_mask(row_mask, dims, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr):
    """``row_mask`` over a ``[rows, HEAD_DIM_PADDED]`` tile, and on a padded head (``HEAD_DIM`` not a power of two)
    also the lanes ``dims < HEAD_DIM``: loads fill the lanes past the head with 0, stores leave them out. A
    power-of-two head gets the row mask alone, so its loads and stores compile as they did before padding."""
    if HEAD_DIM == HEAD_DIM_PADDED:
        mask = row_mask[:, None]
    else:
        mask = row_mask[:, None] & (dims[None, :] < HEAD_DIM)
    return mask


@triton.jit
def load_kv_tile(k_cache_ptr, v_cache_ptr, block_table_row, tile_start, end, kv_head, NUM_KV_HEADS: tl.constexpr,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """The keys and values at positions ``[tile_start, tile_start + BLOCK_N)`` of KV head ``kv_head``, found through
    ``block_table_row`` in a paged cache ``[num_blocks, block_size, num_kv_heads, head_dim]``; with the positions and
    which of them lie before ``end``. ``MASKED`` reads only those (the others come back 0, and padding entries of the
    block table are never read); otherwise the whole tile must lie before ``end``, and its loads go unmasked. Tiles
    are ``HEAD_DIM_PADDED`` wide: on a padded head the lanes past ``HEAD_DIM`` come back 0, so they add nothing to
    ``q @ k^T`` and leave the output's padded lanes 0."""
    tokens = tile_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    token_mask = tokens < end
    if MASKED:
        pages = tl.load(block_table_row + tokens // BLOCK_SIZE, mask=token_mask, other=0).to(tl.int64)
    else:
        pages = tl.load(block_table_row + tokens // BLOCK_SIZE).to(tl.int64)
    slots = pages * BLOCK_SIZE + tokens % BLOCK_SIZE
    kv_offsets = slots[:, None] * (NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM + dims[None, :]
    if MASKED:
        kv_mask = lane_mask(token_mask, dims, HEAD_DIM, HEAD_DIM_PADDED)
        k = tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
    elif HEAD_DIM != HEAD_DIM_PADDED:
        head_lanes = dims[None, :] < HEAD_DIM
        k = tl.load(k_cache_ptr + kv_offsets, mask=head_lanes, other=0.0)
        v = tl.load(v_cache_ptr + kv_offsets, mask=head_lanes, other=0.0)
    else:
        k = tl.load(k_cache_ptr + kv_offsets)
        v = tl.load(v_cache_ptr + kv_offsets)
    return tokens, token_mask, k, v


@triton.jit
def tile_scores(q, k, v, qk_scale, softcap, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
                FP8: tl.constexpr):
    """A tile's scores in log2 units (``q @ k^T`` times ``qk_scale``, soft-capped with ``HAS_SOFTCAP``) and its values
    ready for ``p @ v``; an FP8 cache's tiles are converted to the query's dtype first."""
    if FP8:
        k, v = k.to(q.dtype), v.to(q.dtype)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if HAS_SOFTCAP:
        scores = softcap_log2(scores, softcap)
    return scores, v


@triton.jit
def fp8_cache_query(q):
    """The query for dots with an e4m3 cache's tiles, which convert to fp16 exactly in one instruction (to bf16 it
    takes three): a 16-bit query becomes fp16, saturated to its range, NaN kept NaN (a bf16 value between 2**-14
    and 65504 converts exactly; smaller ones round to fp16's subnormals); fp32 stays fp32. Tiles are then converted
    with ``.to(query.dtype)``."""
    if q.dtype != tl.float32:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0, propagate_nan=tl.PropagateNan.ALL).to(tl.float16)
    return q


@triton.jit
def softcap_log2(scores, softcap):
    """``cap * tanh(scores / cap)`` in log2 units (times log2 e) for the kernels' ``exp2`` softmax.

    tanh as ``2 * sigmoid(2x) - 1``: exact at both ends and within float32 rounding of ``cap`` in between; the
    interpreter has no libdevice tanh.
    """
    capped = softcap * (2.0 * tl.sigmoid(2.0 * (scores / softcap)) - 1.0)
    return capped * 1.4426950408889634
