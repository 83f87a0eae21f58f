"""Decode attention over the paged KV cache: one new query token per sequence.

Flash-decoding: each (sequence, KV head) context is cut into ``num_splits`` contiguous ranges, one program per
range, and a second kernel merges the partial results by their log-sum-exp. Splitting lets a small batch with a
long context still occupy every SM; the split count depends only on static shapes (batch size, heads and the
block-table width), never on ``context_lens`` values, so the launch is CUDA-graph capturable. The count is read
from the grid, not compiled in: the decode graphs' batch buckets (a count each) share one compiled kernel. Each
program handles all query heads of one KV head group (GQA), so every K/V tile is read from memory once per group.
Tiles span the head padded to a power of two (``HEAD_DIM_PADDED``; see ``attention_math.lane_mask``).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from hf_minivllm.kernels.attention_math import (check_attention_options, dense_attention, fp8_cache_query,
                                                lane_mask, load_kv_tile, tile_scores, window_start)
from hf_minivllm.kernels.kv_cache import FP8_DTYPE, check_kv_scales, dequantize
from hf_minivllm.kernels.launch import launch
from hf_minivllm.kernels.paged_inputs import check_paged_attention_inputs, padded_head_dim

_LOG2_E = 1.4426950408889634
_MAX_SPLITS = 64
# Aim for about this many programs per SM, so that the grid covers the chip evenly.
_PROGRAMS_PER_SM = 2
# Registers per thread of the FP8 decode kernel: three programs of 4 warps per SM (``_decode_config``).
_FP8_MAX_REGISTERS = 160
# Shared memory an FP8 decode program keeps besides its pipelined tiles (the query, the converted tiles).
_SHARED_MEMORY_MARGIN = 16 * 1024


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    """SM count of a CUDA device; the interpreter (CPU tensors) stands in for a small GPU."""
    if device.type != "cuda":
        return 4
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _shared_memory_bytes(device_index: int) -> int:
    """Shared memory a block may opt in to (torch before 2.7 lacks the property: Triton's driver reports it)."""
    shared = getattr(torch.cuda.get_device_properties(device_index), "shared_memory_per_block_optin", None)
    if shared is None:
        shared = triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
    return shared


def _decode_config(dtype: torch.dtype, cache_dtype: torch.dtype, head_dim: int, device: torch.device) -> dict[str, int]:
    """Tile sizes for tiles ``head_dim`` wide (the head padded to a power of two), swept on an H100 in bf16
    (``bench_kernels.py --tune``): at batch 256, hd 128, 64-token tiles with 4 warps and 3 stages read 2.80 TB/s
    for pages of 16 and 64 (128-token tiles 2.84, 32-token 2.68). fp32 gets smaller tiles to fit in shared memory.

    An FP8 cache's tiles carry half the bytes per token, and its kernel is latency-bound rather than
    bandwidth-bound: compiled freely at head_dim 128 it took 189 registers a thread, so two programs (8 warps)
    shared an SM and the schedulers idled 55% of cycles (Nsight Compute, H200, W1's batch of 256). Capped at
    ``_FP8_MAX_REGISTERS``, three programs fit (a few registers spill): 128-token tiles, 4 warps, 2 stages took
    0.224 ms against 0.233 uncapped at 5 stages and 0.300 for the bf16 cache (a cap of 128 spilled more: 0.239;
    64-token tiles 0.238 at best). Wider heads keep the uncapped 5 stages (twice the registers per tile would spill
    heavily). A GPU with too little shared memory for the stages (one tile each, as Triton 3.6 compiles them) gets
    fewer rather than a failed compile."""
    if dtype == torch.float32:
        return dict(BLOCK_N=32, num_warps=4, num_stages=2)
    if cache_dtype != FP8_DTYPE:
        return dict(BLOCK_N=64, num_warps=4, num_stages=3)
    block_n, capped = 128, head_dim <= 128
    stages = 2 if capped else 5
    if device.type != "cuda":
        return dict(BLOCK_N=block_n, num_warps=4, num_stages=stages)
    stage_bytes = block_n * head_dim * cache_dtype.itemsize
    index = device.index if device.index is not None else torch.cuda.current_device()
    stages = max(1, min(stages, (_shared_memory_bytes(index) - _SHARED_MEMORY_MARGIN) // stage_bytes))
    config = dict(BLOCK_N=block_n, num_warps=4, num_stages=stages)
    if capped and torch.version.hip is None:  # a register cap is an NVIDIA (ptxas) option
        config["maxnreg"] = _FP8_MAX_REGISTERS
    return config


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, block_n: int, num_sms: int) -> int:
    """How many ranges to cut each context into, from static shapes only (graph capturable).

    Enough programs to give every SM about ``_PROGRAMS_PER_SM`` of them, but no split shorter than one tile of
    the longest possible context.
    """
    programs = batch * num_kv_heads
    wanted = triton.cdiv(_PROGRAMS_PER_SM * num_sms, programs)
    return max(1, min(wanted, triton.cdiv(max_context, block_n), _MAX_SPLITS))


def _reduce_width(num_splits: int) -> int:
    """The merge kernel's tile of splits: two sizes, so that the batch-size buckets of the CUDA graphs (each with
    its own split count) compile it twice rather than once per count, which cost seconds of start-up."""
    return 8 if num_splits <= 8 else _MAX_SPLITS


def window_pages(sliding_window: int, block_size: int) -> int:
    """The most pages a window of ``sliding_window`` keys can touch (it may start anywhere in its first page)."""
    return (sliding_window + block_size - 2) // block_size + 1


def paged_decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 context_lens: torch.Tensor, block_tables: torch.Tensor, softmax_scale: float,
                                 *, sliding_window: int | None = None, softcap: float | None = None,
                                 kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Reference (and CPU path): gather each sequence's pages into a padded dense K/V, then masked attention.

    Computes in the input dtype, as HF's attention does, so fp32 matches HF to rounding. With ``sliding_window``
    the new token sees its last ``sliding_window`` keys (itself included) and only the pages holding them are read;
    ``softcap`` caps the scores as ``cap * tanh(score / cap)`` before the softmax. An FP8 cache is read back with
    its ``kv_scales`` (``hf_minivllm.kernels.kv_cache``).
    """
    check_attention_options(sliding_window, softcap)
    check_kv_scales(k_cache, kv_scales)
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    width = block_tables.shape[1]
    if not (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        # Read no more pages than the longest context needs (a host sync, fine outside graph capture).
        width = max(1, min(width, triton.cdiv(int(context_lens.max()), block_size)))
    context_lens = context_lens.to(torch.int64)
    # The first key each row sees, and the first page read: the window's, which moves along the block table.
    first_key = window_start(context_lens - 1, sliding_window)
    first_page = first_key // block_size
    if sliding_window is not None:
        width = min(width, window_pages(sliding_window, block_size))
    pages_needed = (context_lens + block_size - 1) // block_size
    page_index = first_page[:, None] + torch.arange(width, device=q.device)[None, :]
    page_valid = page_index < pages_needed[:, None]
    pages = torch.where(page_valid, block_tables.to(torch.int64).gather(1, page_index.clamp(max=block_tables.shape[1] - 1)), 0)
    positions = first_page[:, None] * block_size + torch.arange(width * block_size, device=q.device)[None, :]
    # An empty (padding) row still sees position 0, so that it yields finite values rather than NaN.
    visible = (positions < context_lens.clamp(min=1)[:, None]) & (positions >= first_key[:, None])
    # Slots outside what a row sees hold other tokens or whatever the cache memory held, possibly NaN, which would
    # survive the mask (NaN scores, 0 * NaN values): zero them.
    hidden = ~visible[:, :, None, None]
    # index_select over whole pages is a row copy; advanced indexing (cache[pages]) was ~10x slower on CPU.
    pages = pages.reshape(-1)
    scales = (None, None) if kv_scales is None else (kv_scales[0], kv_scales[1])
    keys = dequantize(k_cache.index_select(0, pages), scales[0], q.dtype).view(batch, width * block_size, num_kv_heads,
                                                                               head_dim)
    values = dequantize(v_cache.index_select(0, pages), scales[1], q.dtype).view(batch, width * block_size,
                                                                                 num_kv_heads, head_dim)
    keys, values = keys.masked_fill_(hidden, 0), values.masked_fill_(hidden, 0)
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)
    # GQA without copying K/V per query head: each KV head's query heads form its rows of queries.
    grouped_q = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = dense_attention(grouped_q, keys, values, visible[:, None, None, :], softmax_scale, softcap)
    return out.reshape(batch, num_heads, head_dim)


@triton.jit
def _attend_tile(q, m_i, l_i, acc, tile_start, end, k_cache_ptr, v_cache_ptr, block_table_row, kv_head, qk_scale,
                 softcap, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, FP8: tl.constexpr):
    """One online-softmax step over the keys ``[tile_start, tile_start + BLOCK_N)``: ``MASKED``, only those before
    ``end``; otherwise the tile lies wholly before it and its loads go unmasked."""
    _, token_mask, k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, block_table_row, tile_start, end, kv_head,
                                       NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_PADDED, BLOCK_SIZE, BLOCK_N, MASKED)
    scores, v = tile_scores(q, k, v, qk_scale, softcap, HAS_SOFTCAP, DOT_PRECISION, FP8)
    if MASKED:
        scores = tl.where(token_mask[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attend_keys(q, k_cache_ptr, v_cache_ptr, block_table_row, start, end, kv_head, qk_scale, softcap,
                 NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, FP8: tl.constexpr):
    """Online softmax of the query rows ``q [ROWS, HEAD_DIM_PADDED]`` over keys ``start..end`` of one KV head, found
    through ``block_table_row``: the running max (log2 units), sum and unnormalised output, tile by tile. Only the
    last tile, when partial, is masked: the others load without masks (on an H200 an FP8 decode step took 6% less
    time, 0.235 ms against 0.249 at W1's batch of 256), but for a padded head's lanes."""
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM_PADDED], dtype=tl.float32)
    # (The maximum matters: a negative range's division rounds toward zero compiled but floors interpreted.)
    whole_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
    for tile_start in range(start, whole_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, tile_start, end, k_cache_ptr, v_cache_ptr, block_table_row,
                                     kv_head, qk_scale, softcap, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_PADDED, BLOCK_SIZE,
                                     BLOCK_N, MASKED=False, HAS_SOFTCAP=HAS_SOFTCAP, DOT_PRECISION=DOT_PRECISION,
                                     FP8=FP8)
    if whole_end < end:
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, whole_end, end, k_cache_ptr, v_cache_ptr, block_table_row,
                                     kv_head, qk_scale, softcap, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_PADDED, BLOCK_SIZE,
                                     BLOCK_N, MASKED=True, HAS_SOFTCAP=HAS_SOFTCAP, DOT_PRECISION=DOT_PRECISION,
                                     FP8=FP8)
    return m_i, l_i, acc


# The block table's row stride is its width, which follows the batch's longest sequence: specialising on it
# (divisible by 16 or not) would compile the kernel again mid-run; the cascade's arguments likewise.
@triton.jit(do_not_specialize=["block_table_stride", "partial_splits", "split_offset"])
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, kv_scales_ptr,
    out_ptr, partial_out_ptr, partial_lse_ptr,
    qk_scale, sliding_window, softcap,
    q_seq_stride, q_head_stride, out_seq_stride, out_head_stride, block_table_stride,
    prefix_len_ptr, partial_splits, split_offset,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FP8: tl.constexpr, CASCADE: tl.constexpr = False,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    context_len = tl.load(context_lens_ptr + seq)
    # The keys the new token sees: all of them, or its window's (splits then cover the window only, so pages
    # before it are never read); in a cascade, those past the shared prefix.
    if HAS_WINDOW:
        first = tl.maximum(context_len - sliding_window, 0)
    elif CASCADE:
        first = tl.load(prefix_len_ptr)
    else:
        first = context_len * 0
    # Split lengths are whole tiles, so only a split's last tile can be partial.
    num_splits = tl.num_programs(2)  # not a constant: one compiled kernel serves every split count
    split_len = tl.cdiv(tl.cdiv(context_len - first, num_splits), BLOCK_N) * BLOCK_N
    start = first + split * split_len
    end = tl.minimum(start + split_len, context_len)

    heads = tl.arange(0, BLOCK_H)
    head_mask = heads < GROUP_SIZE
    q_heads = kv_head * GROUP_SIZE + heads
    dims = tl.arange(0, HEAD_DIM_PADDED)
    q_mask = lane_mask(head_mask, dims, HEAD_DIM, HEAD_DIM_PADDED)
    seq64 = seq.to(tl.int64)
    q = tl.load(q_ptr + seq64 * q_seq_stride + q_heads[:, None] * q_head_stride + dims[None, :], mask=q_mask,
                other=0.0)
    if FP8:  # keys are read back as stored * key scale: the scale joins the score scale
        qk_scale = qk_scale * tl.load(kv_scales_ptr)
        q = fp8_cache_query(q)

    m_i, l_i, acc = _attend_keys(q, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq64 * block_table_stride,
                                 start, end, kv_head, qk_scale, softcap, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_PADDED,
                                 BLOCK_SIZE, BLOCK_H, BLOCK_N, HAS_SOFTCAP, DOT_PRECISION, FP8)

    # An empty split (or an empty padding row) leaves l_i == 0: write zeros and a log-sum-exp of -inf.
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    out = acc / safe_l[:, None]
    if FP8:  # values likewise: the output is linear in them
        out = out * tl.load(kv_scales_ptr + 1)
    if SINGLE_SPLIT:
        out_offsets = seq64 * out_seq_stride + q_heads[:, None] * out_head_stride + dims[None, :]
        tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        row = (seq64 * NUM_HEADS + q_heads) * partial_splits + split_offset + split
        tl.store(partial_out_ptr + row[:, None] * HEAD_DIM + dims[None, :], out, mask=q_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(partial_lse_ptr + row, lse, mask=head_mask)


@triton.jit(do_not_specialize=["batch", "partial_splits"])
def _cascade_prefix_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, partial_out_ptr, partial_lse_ptr,
    batch, prefix_len_ptr, partial_splits, qk_scale, softcap, q_seq_stride, q_head_stride,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The shared prefix's part of a cascade: ``BLOCK_Q`` sequences' queries (all heads of one KV head group)
    against one range of the prefix, whose pages are the first row of the block table (every row holds the same
    there). Each K/V tile is read once for those sequences instead of once per sequence. The prefix's length is
    read on the device (a CUDA graph serves every length): splits past it are empty."""
    q_tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    prefix_len = tl.load(prefix_len_ptr)
    split_len = tl.cdiv(tl.cdiv(prefix_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, prefix_len)

    query_rows = tl.arange(0, BLOCK_Q * BLOCK_G)
    seqs = (q_tile * BLOCK_Q + query_rows // BLOCK_G).to(tl.int64)
    group_heads = query_rows % BLOCK_G
    row_mask = (seqs < batch) & (group_heads < GROUP_SIZE)
    q_heads = kv_head * GROUP_SIZE + group_heads
    dims = tl.arange(0, HEAD_DIM_PADDED)
    q_mask = lane_mask(row_mask, dims, HEAD_DIM, HEAD_DIM_PADDED)
    q = tl.load(q_ptr + seqs[:, None] * q_seq_stride + q_heads[:, None] * q_head_stride + dims[None, :], mask=q_mask,
                other=0.0)

    m_i, l_i, acc = _attend_keys(q, k_cache_ptr, v_cache_ptr, block_tables_ptr, start, end, kv_head, qk_scale,
                                 softcap, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_PADDED, BLOCK_SIZE, BLOCK_Q * BLOCK_G,
                                 BLOCK_N, HAS_SOFTCAP, DOT_PRECISION, False)

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    row = (seqs * NUM_HEADS + q_heads) * partial_splits + split
    tl.store(partial_out_ptr + row[:, None] * HEAD_DIM + dims[None, :], acc / safe_l[:, None], mask=q_mask)
    tl.store(partial_lse_ptr + row, tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf")), mask=row_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    partial_out_ptr, partial_lse_ptr, out_ptr, out_seq_stride, out_head_stride, num_splits,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_SPLITS)
    split_mask = splits < num_splits
    dims = tl.arange(0, HEAD_DIM_PADDED)
    rows = (seq * NUM_HEADS + head) * num_splits + splits
    lse = tl.load(partial_lse_ptr + rows, mask=split_mask, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp2(lse - lse_max)
    partial = tl.load(partial_out_ptr + rows[:, None] * HEAD_DIM + dims[None, :],
                      mask=lane_mask(split_mask, dims, HEAD_DIM, HEAD_DIM_PADDED), other=0.0)
    total = tl.sum(weights, axis=0)
    out = tl.sum(partial * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    out_ptrs = out_ptr + seq * out_seq_stride + head * out_head_stride + dims
    if HEAD_DIM == HEAD_DIM_PADDED:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           context_lens: torch.Tensor, block_tables: torch.Tensor, softmax_scale: float,
                           *, sliding_window: int | None = None, softcap: float | None = None,
                           kv_scales: torch.Tensor | None = None, num_splits: int | None = None) -> torch.Tensor:
    """Triton split-KV decode attention: ``q [n, heads, head_dim]`` -> ``[n, heads, head_dim]``.

    ``context_lens`` [n] int32 counts each sequence's tokens (the new one included, already in the cache);
    ``block_tables`` [n, width] int32. ``sliding_window``: the token sees its last ``sliding_window`` keys, and
    only their pages are read; ``softcap``: scores become ``cap * tanh(score / cap)``. ``kv_scales``: an FP8
    cache's scales, read on the device. ``num_splits`` overrides the static heuristic (tests use it).
    """
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    check_paged_attention_inputs("decode", q, k_cache, v_cache, block_tables)
    check_attention_options(sliding_window, softcap)
    check_kv_scales(k_cache, kv_scales)
    out = torch.empty_like(q)
    if batch == 0:
        return out
    head_dim_padded = padded_head_dim(head_dim)
    config = _decode_config(q.dtype, k_cache.dtype, head_dim_padded, q.device)
    block_n = config.pop("BLOCK_N")
    if num_splits is None:
        max_keys = block_tables.shape[1] * block_size
        if sliding_window is not None:
            max_keys = min(max_keys, sliding_window)
        num_splits = choose_num_splits(batch, num_kv_heads, max_keys, block_n, _sm_count(q.device))
    group_size = num_heads // num_kv_heads
    if num_splits > 1:
        partial_out = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        partial_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        partial_out = partial_lse = out  # unused: the single split writes the output directly
    launch(_decode_split_kernel, (batch, num_kv_heads, num_splits),
        q, k_cache, v_cache, block_tables, context_lens, kv_scales if kv_scales is not None else context_lens,
        out, partial_out, partial_lse,
        softmax_scale if softcap is not None else softmax_scale * _LOG2_E, sliding_window or 0, softcap or 1.0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), context_lens, num_splits, 0,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, GROUP_SIZE=group_size, HEAD_DIM=head_dim,
        HEAD_DIM_PADDED=head_dim_padded, BLOCK_SIZE=block_size, BLOCK_H=max(16, triton.next_power_of_2(group_size)),
        BLOCK_N=block_n,
        SINGLE_SPLIT=num_splits == 1, HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=softcap is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", FP8=kv_scales is not None,
        **config,
    )
    if num_splits > 1:
        launch(_decode_reduce_kernel, (batch, num_heads),
            partial_out, partial_lse, out, out.stride(0), out.stride(1), num_splits,
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded,
            BLOCK_SPLITS=_reduce_width(num_splits), num_warps=4,
        )
    return out


# Sequences per program of a cascade's prefix part: their queries (times the group's heads) form the rows of one
# tensor-core tile, so each prefix K/V tile is read once per this many sequences. Large head groups (or wide heads)
# take fewer, so that a program holds at most CASCADE_MAX_ROWS query rows of head dim 128 (the accumulator is
# float32 in registers).
CASCADE_BLOCK_Q = 16
CASCADE_MAX_ROWS = 64


def cascade_sequences_per_tile(group_size: int, head_dim: int) -> int:
    """``CASCADE_BLOCK_Q``, or fewer where the group's heads would make the tile too large (at least 16 rows). The
    accumulator spans the head padded to a power of two, and so the rows stay a power of two."""
    rows = max(CASCADE_MAX_ROWS * 128 // padded_head_dim(head_dim), 16)
    return max(1, min(CASCADE_BLOCK_Q, rows // triton.next_power_of_2(group_size)))


def cascade_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             context_lens: torch.Tensor, block_tables: torch.Tensor, softmax_scale: float,
                             shared_prefix_len: torch.Tensor, *, softcap: float | None = None) -> torch.Tensor:
    """Decode attention for a batch whose sequences share their first ``shared_prefix_len`` tokens (the same pages,
    as prefix caching leaves them): the prefix is attended once per tile of sequences (``CASCADE_BLOCK_Q``, fewer for
    large head groups: ``cascade_sequences_per_tile``), each sequence's own tokens by the split kernel, and all
    partial results merged by their log-sum-exp. The same result as ``paged_decode_attention`` (to rounding),
    reading the prefix's K/V once per tile of sequences instead of once per sequence.

    ``shared_prefix_len``: [1] int32 on the device (so a CUDA graph serves any length), a multiple of the block
    size below every sequence's context length (each keeps at least its new token), 0 for none; the first
    ``shared_prefix_len // block_size`` entries of every block-table row must be equal. Split counts follow the
    block table's width, as in ``paged_decode_attention``. Not for windowed layers or an FP8 cache
    (``paged_decode_attention`` serves those).
    """
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    check_paged_attention_inputs("decode", q, k_cache, v_cache, block_tables)
    check_attention_options(None, softcap)
    if k_cache.dtype == FP8_DTYPE:
        raise ValueError("cascade_decode_attention does not read an FP8 cache; use paged_decode_attention")
    if (shared_prefix_len.shape != (1,) or shared_prefix_len.dtype != torch.int32
            or shared_prefix_len.device != q.device):
        raise ValueError(f"shared_prefix_len must be a [1] int32 tensor on {q.device}, got "
                         f"{tuple(shared_prefix_len.shape)} {shared_prefix_len.dtype} on {shared_prefix_len.device}")
    out = torch.empty_like(q)
    if batch == 0:
        return out
    head_dim_padded = padded_head_dim(head_dim)
    config = _decode_config(q.dtype, k_cache.dtype, head_dim_padded, q.device)
    block_n = config.pop("BLOCK_N")
    sms = _sm_count(q.device)
    max_keys = block_tables.shape[1] * block_size
    # At most _MAX_SPLITS in all, the merge kernel's widest tile: the prefix keeps at least one.
    suffix_splits = min(choose_num_splits(batch, num_kv_heads, max_keys, block_n, sms), _MAX_SPLITS - 1)
    group_size = num_heads // num_kv_heads
    block_q = cascade_sequences_per_tile(group_size, head_dim)
    q_tiles = triton.cdiv(batch, block_q)
    prefix_splits = choose_num_splits(q_tiles, num_kv_heads, max_keys, block_n, sms)
    prefix_splits = max(1, min(prefix_splits, _MAX_SPLITS - suffix_splits))
    total_splits = prefix_splits + suffix_splits
    partial_out = torch.empty(batch, num_heads, total_splits, head_dim, dtype=torch.float32, device=q.device)
    partial_lse = torch.empty(batch, num_heads, total_splits, dtype=torch.float32, device=q.device)
    qk_scale = softmax_scale if softcap is not None else softmax_scale * _LOG2_E
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    launch(_cascade_prefix_kernel, (q_tiles, num_kv_heads, prefix_splits),
        q, k_cache, v_cache, block_tables, partial_out, partial_lse,
        batch, shared_prefix_len, total_splits, qk_scale, softcap or 1.0, q.stride(0), q.stride(1),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, GROUP_SIZE=group_size, HEAD_DIM=head_dim,
        HEAD_DIM_PADDED=head_dim_padded, BLOCK_SIZE=block_size, BLOCK_Q=block_q,
        BLOCK_G=triton.next_power_of_2(group_size), BLOCK_N=block_n,
        HAS_SOFTCAP=softcap is not None, DOT_PRECISION=dot_precision, **config,
    )
    launch(_decode_split_kernel, (batch, num_kv_heads, suffix_splits),
        q, k_cache, v_cache, block_tables, context_lens, context_lens,
        out, partial_out, partial_lse,
        qk_scale, 0, softcap or 1.0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        shared_prefix_len, total_splits, prefix_splits,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, GROUP_SIZE=group_size, HEAD_DIM=head_dim,
        HEAD_DIM_PADDED=head_dim_padded, BLOCK_SIZE=block_size, BLOCK_H=max(16, triton.next_power_of_2(group_size)),
        BLOCK_N=block_n,
        SINGLE_SPLIT=False, HAS_WINDOW=False, HAS_SOFTCAP=softcap is not None,
        DOT_PRECISION=dot_precision, FP8=False, CASCADE=True, **config,
    )
    launch(_decode_reduce_kernel, (batch, num_heads),
        partial_out, partial_lse, out, out.stride(0), out.stride(1), total_splits,
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded,
        BLOCK_SPLITS=_reduce_width(total_splits), num_warps=4,
    )
    return out
