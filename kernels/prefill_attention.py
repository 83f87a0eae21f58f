"""Prefill attention over the paged KV cache: variable-length causal attention for packed sequences.

Each sequence's queries are the last ``query_len`` tokens of its context (a cached prefix, possibly empty, comes
first); all of its keys and values, the new ones included, are read from the cache pages, since ``store_kvcache``
has already written this step's K/V. Query token ``i`` sits at position ``prefix_len + i`` and sees keys at
positions ``<= prefix_len + i`` (and, with a sliding window ``w``, ``> prefix_len + i - w``). Tiles span the head
padded to a power of two (``HEAD_DIM_PADDED``; see ``attention_math.lane_mask``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_minivllm.kernels.attention_math import (check_attention_options, dense_attention, fp8_cache_query,
                                                lane_mask, load_kv_tile, tile_scores, window_start)
from hf_minivllm.kernels.kv_cache import check_kv_scales, dequantize
from hf_minivllm.kernels.launch import launch
from hf_minivllm.kernels.paged_inputs import check_paged_attention_inputs, padded_head_dim

_LOG2_E = 1.4426950408889634


def _gather_keys(cache: torch.Tensor, block_table_row: torch.Tensor, first: int, end: int) -> torch.Tensor:
    """One sequence's keys (or values) at positions ``[first, end)``, ``[end - first, kv_heads, head_dim]``, read from
    the pages holding them only."""
    block_size = cache.shape[1]
    first_page = first // block_size
    pages = block_table_row[first_page : triton.cdiv(end, block_size)].to(torch.int64)
    offset = first - first_page * block_size
    return cache.index_select(0, pages).flatten(0, 1)[offset : offset + end - first]


def paged_prefill_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                                  max_seqlen_k: int, block_tables: torch.Tensor, softmax_scale: float,
                                  *, sliding_window: int | None = None, softcap: float | None = None,
                                  kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Reference (and CPU path): per sequence, gather K/V from the pages and attend with a causal mask shifted by
    the prefix length (and HF's sliding-window overlay, ``key > query - sliding_window``, when given; pages before
    the first query's window are not read). Computes in the input dtype, as HF's attention does; ``softcap``
    follows HF's eager attention (see ``dense_attention``). An FP8 cache is read back with its ``kv_scales``."""
    check_attention_options(sliding_window, softcap)
    check_kv_scales(k_cache, kv_scales)
    scales = (None, None) if kv_scales is None else (kv_scales[0], kv_scales[1])
    num_heads = q.shape[1]
    group = num_heads // k_cache.shape[2]
    out = torch.empty_like(q)
    q_bounds = cu_seqlens_q.tolist()
    k_bounds = cu_seqlens_k.tolist()
    for seq in range(len(q_bounds) - 1):
        q_start, q_end = q_bounds[seq], q_bounds[seq + 1]
        query_len, context_len = q_end - q_start, k_bounds[seq + 1] - k_bounds[seq]
        if query_len == 0:
            continue
        query_positions = torch.arange(context_len - query_len, context_len, device=q.device)
        first = int(window_start(query_positions[:1], sliding_window))
        keys = dequantize(_gather_keys(k_cache, block_tables[seq], first, context_len), scales[0], q.dtype)
        values = dequantize(_gather_keys(v_cache, block_tables[seq], first, context_len), scales[1], q.dtype)
        keys = keys.transpose(0, 1).repeat_interleave(group, dim=0)
        values = values.transpose(0, 1).repeat_interleave(group, dim=0)
        queries = q[q_start:q_end].transpose(0, 1)
        if query_len == context_len and sliding_window is None and softcap is None:
            attended = torch.nn.functional.scaled_dot_product_attention(
                queries, keys, values, is_causal=True, scale=softmax_scale)
        else:
            key_positions = torch.arange(first, context_len, device=q.device)[None, :]
            visible = ((key_positions <= query_positions[:, None])
                       & (key_positions >= window_start(query_positions, sliding_window)[:, None]))
            attended = dense_attention(queries, keys, values, visible, softmax_scale, softcap)
        out[q_start:q_end] = attended.transpose(0, 1)
    return out


def _prefill_config(head_dim: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes for tiles ``head_dim`` wide (the head padded to a power of two), swept on an H100 in bf16
    (``bench_kernels.py --tune``; 16 x 1024 causal, pages of 16 to 128): hd 128 ran 237-241 TFLOP/s with these (186
    with 8 warps), hd 64 236. fp32 gets small tiles to fit in shared memory."""
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
    if head_dim >= 128:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if head_dim >= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)


@triton.jit
def _attend_tile(q, m_i, l_i, acc, tile_start, k_cache_ptr, v_cache_ptr, block_table_row, kv_head, query_positions,
                 context_len, qk_scale, sliding_window, softcap,
                 NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8: tl.constexpr):
    """One online-softmax step over keys ``[tile_start, tile_start + BLOCK_N)``, read through the block table.

    ``MASKED`` tiles apply the causal mask, the context end and the sliding window; the others are visible to every
    query row. A window can hide a whole tile from a row: its max is then -inf and the step adds nothing.
    """
    tokens, token_mask, k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, block_table_row, tile_start, context_len,
                                            kv_head, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_PADDED, BLOCK_SIZE, BLOCK_N,
                                            MASKED)
    scores, v = tile_scores(q, k, v, qk_scale, softcap, HAS_SOFTCAP, DOT_PRECISION, FP8)
    if MASKED:
        visible = (tokens[None, :] <= query_positions[:, None]) & token_mask[None, :]
        if HAS_WINDOW:
            visible = visible & (tokens[None, :] > query_positions[:, None] - sliding_window)
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    if HAS_WINDOW:  # a row that has seen no key yet keeps a -inf max: subtract 0 instead (exp2(-inf) = 0)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(scores - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# The block table's row stride is its width, which follows the batch's longest sequence: specialising on it
# (divisible by 16 or not) would compile the kernel again mid-run.
@triton.jit(do_not_specialize=["block_table_stride"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, cu_seqlens_q_ptr, cu_seqlens_k_ptr, block_tables_ptr, kv_scales_ptr,
    qk_scale, sliding_window, softcap,
    q_token_stride, q_head_stride, out_token_stride, out_head_stride, block_table_stride,
    NUM_KV_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8: tl.constexpr,
):
    head = tl.program_id(0)
    seq = tl.program_id(1)
    # The grid's slowest axis runs over query tiles, last tile first: the longest tiles start earliest.
    m_block = tl.num_programs(2) - 1 - tl.program_id(2)

    q_start = tl.load(cu_seqlens_q_ptr + seq)
    query_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if m_block * BLOCK_M < query_len:
        context_len = tl.load(cu_seqlens_k_ptr + seq + 1) - tl.load(cu_seqlens_k_ptr + seq)
        prefix_len = context_len - query_len
        kv_head = head // GROUP_SIZE

        rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < query_len
        dims = tl.arange(0, HEAD_DIM_PADDED)
        q_mask = lane_mask(row_mask, dims, HEAD_DIM, HEAD_DIM_PADDED)
        q_tokens = (q_start + rows).to(tl.int64)
        q = tl.load(q_ptr + q_tokens[:, None] * q_token_stride + head * q_head_stride + dims[None, :], mask=q_mask,
                    other=0.0)
        query_positions = prefix_len + rows
        if FP8:  # keys are read back as stored * key scale: the scale joins the score scale
            qk_scale = qk_scale * tl.load(kv_scales_ptr)
            q = fp8_cache_query(q)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
        block_table_row = block_tables_ptr + seq.to(tl.int64) * block_table_stride
        first_row = prefix_len + m_block * BLOCK_M  # positions of the tile's first and last query
        causal_end = tl.minimum(context_len, first_row + BLOCK_M)
        if HAS_WINDOW:
            # Tiles before the first query's window are skipped; from the last query's window on, every row sees
            # every key up to the first query.
            window_lo = tl.maximum(first_row - sliding_window + 1, 0) // BLOCK_N * BLOCK_N
            unmasked_start = tl.cdiv(tl.maximum(causal_end - sliding_window, 0), BLOCK_N) * BLOCK_N
        else:
            window_lo = first_row * 0
            unmasked_start = first_row * 0
        # Keys before the tile's first query position are visible to every row: no causal mask needed there.
        unmasked_end = first_row // BLOCK_N * BLOCK_N
        for tile_start in range(window_lo, tl.minimum(unmasked_start, causal_end), BLOCK_N):
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, tile_start, k_cache_ptr, v_cache_ptr, block_table_row,
                                         kv_head, query_positions, context_len, qk_scale, sliding_window, softcap,
                                         NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_PADDED, BLOCK_SIZE, BLOCK_N, True,
                                         HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION, FP8)
        for tile_start in range(unmasked_start, unmasked_end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, tile_start, k_cache_ptr, v_cache_ptr, block_table_row,
                                         kv_head, query_positions, context_len, qk_scale, sliding_window, softcap,
                                         NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_PADDED, BLOCK_SIZE, BLOCK_N, False,
                                         HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION, FP8)
        for tile_start in range(tl.maximum(unmasked_start, unmasked_end), causal_end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, tile_start, k_cache_ptr, v_cache_ptr, block_table_row,
                                         kv_head, query_positions, context_len, qk_scale, sliding_window, softcap,
                                         NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_PADDED, BLOCK_SIZE, BLOCK_N, True,
                                         HAS_WINDOW, HAS_SOFTCAP, DOT_PRECISION, FP8)

        if HAS_WINDOW:  # a padding row past the queries may see no key at all: 0, not 0/0 (it is not stored)
            l_i = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_i[:, None]
        if FP8:  # values likewise: the output is linear in them
            out = out * tl.load(kv_scales_ptr + 1)
        tl.store(out_ptr + q_tokens[:, None] * out_token_stride + head * out_head_stride + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                            max_seqlen_k: int, block_tables: torch.Tensor, softmax_scale: float,
                            *, sliding_window: int | None = None, softcap: float | None = None,
                            kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Triton flash-attention prefill (online softmax, K/V tiles gathered through the block table).

    ``q [tokens, heads, head_dim]`` -> ``[tokens, heads, head_dim]``; ``cu_seqlens_*`` [n+1] int32.
    ``max_seqlen_k`` is accepted for API parity with flash-attn; the kernel reads each length from the device.
    ``sliding_window``: each query sees its last ``sliding_window`` keys (tiles wholly outside every query's window
    are not read); ``softcap``: scores become ``cap * tanh(score / cap)``; ``kv_scales``: an FP8 cache's scales.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    check_paged_attention_inputs("prefill", q, k_cache, v_cache, block_tables)
    check_attention_options(sliding_window, softcap)
    check_kv_scales(k_cache, kv_scales)
    out = torch.empty_like(q)
    num_seqs = cu_seqlens_q.shape[0] - 1
    if num_tokens == 0 or num_seqs == 0:
        return out
    head_dim_padded = padded_head_dim(head_dim)
    config = _prefill_config(head_dim_padded, q.dtype)
    block_m = config["BLOCK_M"]
    grid = (num_heads, num_seqs, triton.cdiv(max_seqlen_q, block_m))
    launch(_prefill_kernel, grid,
        q, k_cache, v_cache, out, cu_seqlens_q, cu_seqlens_k, block_tables,
        kv_scales if kv_scales is not None else cu_seqlens_q, softmax_scale if softcap is not None else softmax_scale * _LOG2_E, sliding_window or 0, softcap or 1.0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        NUM_KV_HEADS=num_kv_heads, GROUP_SIZE=num_heads // num_kv_heads, HEAD_DIM=head_dim,
        HEAD_DIM_PADDED=head_dim_padded, BLOCK_SIZE=block_size,
        HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=softcap is not None, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        FP8=kv_scales is not None, **config,
    )
    return out
