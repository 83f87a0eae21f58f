"""The expert MLPs of a sparse MoE block: ``sum_k w[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t))`` over each token's
top-k experts ``e = ids[t, k]``.

Expert weights are stacked as transformers stores them: ``gate_up [E, 2I, H]`` (``[gate | up]`` rows per expert) and
``down [E, H, I]``. The Triton path groups the (token, slot) pairs by expert in torch (``align_pairs_by_expert``),
then runs two grouped GEMMs: gate_up with SiLU-and-mul in its epilogue, and down with the routing weight in its
epilogue; the k weighted rows of each token are summed in torch. Every shape on that path depends only on the token
count, top-k, the number of experts and the block size (never on the routing), and nothing waits for the host, so
it can be captured in a CUDA graph.

Rounding follows transformers' default ``grouped_mm`` experts: each GEMM's output is rounded to the model dtype,
``silu(gate)`` too before the product with ``up``, the routing weight multiplies in the model dtype, and the k rows
are summed by ``torch.sum`` (float32 accumulation for 16-bit dtypes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hf_minivllm.kernels.launch import launch


def fused_moe_torch(hidden: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor) -> torch.Tensor:
    """Reference (and CPU path): one GEMM pair per expert that has tokens, as transformers' ``grouped_mm``.

    ``hidden [T, H]``, ``gate_up [E, 2I, H]``, ``down [E, H, I]``, ``topk_weights [T, k]`` (model dtype),
    ``topk_ids [T, k]`` -> ``[T, H]``."""
    num_tokens, top_k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=gate_up.shape[0]).tolist()  # one host sync: fine on the CPU path
    pair_out = hidden.new_empty(num_tokens * top_k, hidden.shape[1])
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]
        gate, up = F.linear(hidden[pairs // top_k], gate_up[expert]).chunk(2, dim=-1)
        pair_out[pairs] = F.linear(F.silu(gate) * up, down[expert])
        start += count
    weighted = pair_out * topk_weights.reshape(-1, 1)
    return weighted.view(num_tokens, top_k, -1).sum(dim=1)


def padded_pair_bound(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows of the expert-sorted pair list: every pair, plus at most ``block_m - 1`` padding rows per expert that
    gets any (at most ``min(num_experts, num_pairs)`` do), rounded up to whole blocks. Known from the shapes alone."""
    rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return triton.cdiv(rows, block_m) * block_m


def align_pairs_by_expert(topk_ids: torch.Tensor, num_experts: int,
                          block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the (token, slot) pairs by expert, each expert's run padded to whole blocks of ``block_m`` rows.

    Returns ``sorted_pairs [padded_pair_bound]`` (int32 pair index ``token * k + slot``; padding rows hold the pair
    count, one past the last pair) and ``block_experts [padded_pair_bound / block_m]`` (int32 expert of each block;
    ``num_experts`` for blocks past the used rows). Device-side torch only: no host sync, no data-dependent shape.
    """
    flat_ids = topk_ids.reshape(-1)
    num_pairs, device = flat_ids.numel(), flat_ids.device
    bound = padded_pair_bound(num_pairs, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    sorted_experts, order = torch.sort(flat_ids, stable=True)
    start_unpadded = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(num_pairs, device=device) - start_unpadded[sorted_experts]
    destination = padded_end[sorted_experts] - padded[sorted_experts] + rank_in_expert
    sorted_pairs = torch.full((bound,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, destination, order.to(torch.int32))
    block_starts = torch.arange(0, bound, block_m, device=device)
    block_experts = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)
    return sorted_pairs, block_experts


@triton.jit(do_not_specialize=["num_pairs"])
def _gate_up_silu_kernel(
    x_ptr, w_ptr, out_ptr, sorted_pairs_ptr, block_experts_ptr,
    num_pairs, top_k, num_experts, hidden_size, intermediate_size,
    stride_xt, stride_xh, stride_we, stride_wn, stride_wk, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """``out[row, n] = silu(x[token] . gate[n]) * (x[token] . up[n])`` for the block's rows of the sorted pairs."""
    pid_m = tl.program_id(0)
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    if expert >= num_experts:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows)
    valid = pairs < num_pairs
    tokens = (pairs // top_k).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < intermediate_size
    w_base = w_ptr + expert * stride_we
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden_size, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < hidden_size
        a = tl.load(x_ptr + tokens[:, None] * stride_xt + ks[None, :] * stride_xh,
                    mask=valid[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & col_mask[None, :]
        w_gate = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wk, mask=w_mask, other=0.0)
        w_up = tl.load(w_base + (cols[None, :] + intermediate_size) * stride_wn + ks[:, None] * stride_wk,
                       mask=w_mask, other=0.0)
        acc_gate = tl.dot(a, w_gate, acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(a, w_up, acc_up, input_precision=PRECISION)
    dtype = out_ptr.dtype.element_ty
    # Each rounding to the model dtype where transformers' separate ops round.
    gate = acc_gate.to(dtype).to(tl.float32)
    up = acc_up.to(dtype).to(tl.float32)
    activated = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on,
             (activated * up).to(dtype), mask=valid[:, None] & col_mask[None, :])


@triton.jit(do_not_specialize=["num_pairs"])
def _down_weighted_kernel(
    a_ptr, w_ptr, topk_weights_ptr, out_ptr, sorted_pairs_ptr, block_experts_ptr,
    num_pairs, num_experts, hidden_size, intermediate_size,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_op, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """``out[pair, n] = topk_weight[pair] * (a[row] . down[n])`` for the block's rows, written at each pair's own
    row (``token * k + slot``), so no two programs write the same place."""
    pid_m = tl.program_id(0)
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    if expert >= num_experts:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows)
    valid = pairs < num_pairs
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < hidden_size
    w_base = w_ptr + expert * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, intermediate_size, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < intermediate_size
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak,
                    mask=valid[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    dtype = out_ptr.dtype.element_ty
    routing = tl.load(topk_weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
    weighted = (acc.to(dtype).to(tl.float32) * routing[:, None]).to(dtype)
    tl.store(out_ptr + pairs[:, None].to(tl.int64) * stride_op + cols[None, :] * stride_on, weighted,
             mask=valid[:, None] & col_mask[None, :])


def _block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per block: 16 while experts get about 16 pairs or fewer (decode: little padding), else 64 (prefill).
    Two sizes only, and the pair count unspecialised, so the engine's warm-up (a full prefill) and its decode-graph
    capture compile every variant a run needs: no compile stalls a request later."""
    return 16 if num_pairs <= 16 * num_experts else 64


def _block(size: int, largest: int) -> int:
    return min(largest, max(16, triton.next_power_of_2(size)))


def fused_moe(hidden: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """Triton experts: same arguments and result as ``fused_moe_torch``; any token count (0 included)."""
    num_tokens, top_k = topk_ids.shape
    num_experts, hidden_size = gate_up.shape[0], hidden.shape[1]
    intermediate_size = down.shape[2]
    expected_gate_up = (num_experts, 2 * intermediate_size, hidden_size)
    if gate_up.shape != expected_gate_up or down.shape[:2] != (num_experts, hidden_size):
        raise ValueError(f"expert weights gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} do not match "
                         f"hidden size {hidden_size}")
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return hidden.new_zeros(num_tokens, hidden_size)
    block_m = _block_m(num_pairs, num_experts)
    sorted_pairs, block_experts = align_pairs_by_expert(topk_ids, num_experts, block_m)
    num_blocks = block_experts.numel()
    # fp32 models: full-precision dots (no TF32), as torch's matmuls compute by default.
    precision = "ieee" if hidden.dtype == torch.float32 else None
    activated = hidden.new_empty(sorted_pairs.numel(), intermediate_size)
    block_n, block_k = _block(intermediate_size, 64), _block(hidden_size, 64)
    launch(_gate_up_silu_kernel, (num_blocks, triton.cdiv(intermediate_size, block_n)),
        hidden, gate_up, activated, sorted_pairs, block_experts,
        num_pairs, top_k, num_experts, hidden_size, intermediate_size,
        hidden.stride(0), hidden.stride(1), gate_up.stride(0), gate_up.stride(1), gate_up.stride(2),
        activated.stride(0), activated.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision, num_warps=4,
    )
    weights = topk_weights.reshape(-1).contiguous()
    pair_out = hidden.new_empty(num_pairs, hidden_size)
    block_n, block_k = _block(hidden_size, 64), _block(intermediate_size, 64)
    launch(_down_weighted_kernel, (num_blocks, triton.cdiv(hidden_size, block_n)),
        activated, down, weights, pair_out, sorted_pairs, block_experts,
        num_pairs, num_experts, hidden_size, intermediate_size,
        activated.stride(0), activated.stride(1), down.stride(0), down.stride(1), down.stride(2),
        pair_out.stride(0), pair_out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision, num_warps=4,
    )
    return pair_out.view(num_tokens, top_k, hidden_size).sum(dim=1)
