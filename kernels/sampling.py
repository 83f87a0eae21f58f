"""Temperature sampling in one pass over the logits: the Gumbel-max trick with in-kernel random numbers.

``argmax(logits / T + G)`` with ``G = -log(-log(U))``, ``U`` uniform, draws from ``softmax(logits / T)``; a row with
``T = 0`` takes the plain argmax. Unlike the torch form (divide, softmax, noise, divide, argmax: about ten passes
over a float32 ``[rows, vocab]`` tensor) the kernel reads the logits once and writes one token id per row.
Uniforms come from Philox (``tl.rand``) keyed by a seed the caller draws from torch's generator on the device, so
``torch.manual_seed`` makes runs repeatable and no host sync is needed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_minivllm.kernels.launch import launch


def gumbel_max_sample_torch(logits: torch.Tensor, temperatures: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Reference: the same draw from explicit uniforms ``[rows, vocab]`` in (0, 1)."""
    gumbel = -torch.log(-torch.log(uniforms))
    scaled = logits.float() / temperatures.clamp_min(1e-6)[:, None] + gumbel
    return torch.where(temperatures == 0, logits.argmax(-1), scaled.argmax(-1))


@triton.jit
def _gumbel_max_kernel(logits_ptr, temperatures_ptr, seed_ptr, out_ptr, row_stride, vocab_size,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    temperature = tl.load(temperatures_ptr + row)
    greedy = temperature == 0.0
    inverse_temperature = 1.0 / tl.where(greedy, 1.0, temperature)
    seed = tl.load(seed_ptr)
    best_score = tl.full((), float("-inf"), tl.float32)
    best_index = tl.full((), 0, tl.int64)
    for start in range(0, vocab_size, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab_size
        x = tl.load(logits_ptr + row * row_stride + cols, mask=mask, other=float("-inf")).to(tl.float32)
        uniform = tl.rand(seed, row * vocab_size + cols)
        gumbel = -tl.log(-tl.log(tl.maximum(uniform, 1e-20)))
        score = tl.where(greedy, x, x * inverse_temperature + gumbel)
        score = tl.where(mask, score, float("-inf"))
        block_best = tl.max(score, axis=0)
        block_index = tl.argmax(score, axis=0).to(tl.int64) + start
        take = block_best > best_score
        best_index = tl.where(take, block_index, best_index)
        best_score = tl.where(take, block_best, best_score)
    tl.store(out_ptr + row, best_index)


def gumbel_max_sample(logits: torch.Tensor, temperatures: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """Token id per row of ``logits [rows, vocab]``: sampled at ``temperatures[row]``, argmax where it is 0.

    ``seed`` is a one-element int64 tensor on the logits' device (read by the kernel, so drawing it needs no sync).
    """
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"gumbel_max_sample takes logits [rows, vocab] contiguous in vocab, got {tuple(logits.shape)}")
    if temperatures.shape != logits.shape[:1] or temperatures.dtype != torch.float32:
        raise ValueError(f"temperatures must be float32 [{logits.shape[0]}], got {temperatures.dtype} {tuple(temperatures.shape)}")
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    if logits.shape[0] == 0:
        return out
    block = min(triton.next_power_of_2(logits.shape[1]), 4096)
    launch(_gumbel_max_kernel, (logits.shape[0],),
        logits, temperatures, seed, out, logits.stride(0), logits.shape[1], BLOCK=block, num_warps=8,
    )
    return out
