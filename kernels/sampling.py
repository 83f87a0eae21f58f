"""Temperature sampling in one pass over the logits: the Gumbel-max trick with in-kernel random numbers.

``argmax(logits / T + G)`` with ``G = -log(-log(U))``, ``U`` uniform, draws from ``softmax(logits / T)``; a row with
``T = 0`` takes the plain argmax. A sampled row whose logits hold NaN or +inf, or nothing finite, has no distribution
to draw from (HF's sampling raises there): its token is -1. Unlike the torch form (divide, softmax, noise, divide,
argmax: about ten passes over a float32 ``[rows, vocab]`` tensor) the kernel reads the logits once and writes one
token id per row.
Uniforms come from Philox (``tl.rand4x``, four per draw) keyed by a seed the caller draws on the device from a
seeded generator, so runs are repeatable and no host sync is needed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from hf_minivllm.kernels.launch import launch

_LN2 = tl.constexpr(0.6931471805599453)
# The token of a sampled row with no distribution to draw from (the kernel reads the constexpr: a jitted function
# may read only constexpr globals).
NO_DISTRIBUTION = -1
_NO_DISTRIBUTION = tl.constexpr(NO_DISTRIBUTION)


def gumbel_max_sample_torch(logits: torch.Tensor, temperatures: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Reference: the same draw from explicit uniforms ``[rows, vocab]`` in (0, 1)."""
    gumbel = -torch.log(-torch.log(uniforms))
    scaled = logits.float() / temperatures.clamp_min(1e-6)[:, None] + gumbel
    sampled = torch.where(torch.isfinite(logits.float().amax(-1)), scaled.argmax(-1), NO_DISTRIBUTION)
    return torch.where(temperatures == 0, logits.argmax(-1), sampled)


@triton.jit
def _fast_log2(x, FAST_LOG: tl.constexpr):
    """log2 for arguments away from 1; with ``FAST_LOG`` the hardware's approximation, one instruction with an
    absolute error of about 2**-22 around 1 (libdevice's exact form is a polynomial of a dozen instructions, which
    the interpreter runs instead)."""
    if FAST_LOG:
        return libdevice.fast_log2f(x)
    return tl.log2(x)


@triton.jit
def _gumbel_max_kernel(logits_ptr, temperatures_ptr, seed_ptr, out_ptr, row_stride, vocab_size,
                       BLOCK: tl.constexpr, FAST_LOG: tl.constexpr):
    """One row per program, ``BLOCK`` columns per step as four contiguous quarters. Each lane keeps its own best
    score over the steps and the lanes meet once at the end; one Philox draw gives the four quarters' uniforms at
    once (``tl.rand4x``). Drawing a uniform per column, two exact logs each and reducing every block across the
    program (0.25 ms at W1's 256 rows of 151,936 on an H200) spent most of the time on Philox's rounds, the logs'
    polynomials and the reductions."""
    row = tl.program_id(0).to(tl.int64)
    temperature = tl.load(temperatures_ptr + row)
    greedy = temperature == 0.0
    inverse_temperature = 1.0 / tl.where(greedy, 1.0, temperature)
    seed = tl.load(seed_ptr)
    logits_row = logits_ptr + row * row_stride
    QUARTER: tl.constexpr = BLOCK // 4
    quarter = tl.arange(0, QUARTER)
    # Each (row, step, position in the quarter) gets its own Philox counter.
    first_counter = row * tl.cdiv(vocab_size, BLOCK) * QUARTER
    best_score = tl.full([QUARTER], float("-inf"), tl.float32)
    best_col = tl.zeros([QUARTER], tl.int32)
    invalid = tl.zeros([QUARTER], tl.int32)  # a NaN or +inf seen by the lane
    for start in range(0, vocab_size, BLOCK):
        uniforms = tl.rand4x(seed, first_counter + start // 4 + quarter)
        # Columns in increasing order per lane, a later one taken only when strictly better: each lane keeps its
        # first best column.
        for part in tl.static_range(4):
            cols = start + part * QUARTER + quarter
            mask = cols < vocab_size
            x = tl.load(logits_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            invalid = invalid | ((x != x) | (x == float("inf"))).to(tl.int32)
            # The Gumbel noise -ln(-ln u) in base 2: -ln2 * log2(-log2 u) - ln(ln 2); the constant moves no argmax.
            # The inner log must be exact: for u just under 1 its value (about 1e-7) is below the fast log's error,
            # and those u give the largest noise. The outer one only shifts a score by about 2e-7.
            gumbel = -_LN2 * _fast_log2(-tl.log2(tl.maximum(uniforms[part], 1e-20)), FAST_LOG)
            score = tl.where(greedy, x, x * inverse_temperature + gumbel)
            take = mask & (score > best_score)
            best_col = tl.where(take, cols, best_col)
            best_score = tl.where(take, score, best_score)
    best = tl.max(best_score, axis=0)
    # The first column among the lanes holding the best score, as argmax picks it (NaN is never picked: a greedy row
    # of -inf or NaN gives 0, where torch's argmax would give a NaN's column).
    first = tl.min(tl.where(best_score == best, best_col, vocab_size), axis=0)
    token = tl.where(first < vocab_size, first, 0)
    no_distribution = (tl.max(invalid, axis=0) > 0) | (best == float("-inf"))
    tl.store(out_ptr + row, tl.where(no_distribution & ~greedy, _NO_DISTRIBUTION, token).to(tl.int64))


def gumbel_max_sample(logits: torch.Tensor, temperatures: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """Token id per row of ``logits [rows, vocab]``: sampled at ``temperatures[row]``, argmax where it is 0; -1 for a
    sampled row with no distribution (NaN or +inf among its logits, or nothing finite).

    ``seed`` is a one-element int64 tensor on the logits' device (read by the kernel, so drawing it needs no sync).
    """
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"gumbel_max_sample takes logits [rows, vocab] contiguous in vocab, got {tuple(logits.shape)}")
    if temperatures.shape != logits.shape[:1] or temperatures.dtype != torch.float32:
        raise ValueError(f"temperatures must be float32 [{logits.shape[0]}], got {temperatures.dtype} {tuple(temperatures.shape)}")
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    if logits.shape[0] == 0:
        return out
    block = max(4, min(triton.next_power_of_2(logits.shape[1]), 4096))
    launch(_gumbel_max_kernel, (logits.shape[0],),
        logits, temperatures, seed, out, logits.stride(0), logits.shape[1], BLOCK=block,
        FAST_LOG=logits.is_cuda and torch.version.hip is None, num_warps=8,
    )
    return out
