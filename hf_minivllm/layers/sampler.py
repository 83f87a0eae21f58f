"""Batched token sampling on the logits' device: greedy, temperature, top-k, top-p, min-p and per-request seeds.

Everything is tensor work on the whole batch; only the host-side flags (is any row using top-k? ...) branch, so no
device-to-host sync happens per request. Sampling uses the exponential-race form of the Gumbel-max trick:
``argmax(p / E)`` with ``E ~ Exp(1)`` draws from ``p``; a seeded request draws its ``E`` from its own generator.
On CUDA a batch with temperatures only (no top-k/top-p/min-p, no seeded request: W1's case) samples in one Triton
pass over the logits (``hf_minivllm.kernels.sampling``) instead of the ten or so passes of the torch form.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hf_minivllm.kernels.sampling import gumbel_max_sample


@dataclass
class SamplingTensors:
    """Per-row settings of one step, already on the logits' device."""

    temperatures: torch.Tensor | None  # [n] float32, 0 = greedy (None when all rows are greedy)
    top_ks: torch.Tensor | None  # [n] int64, vocab size where disabled
    top_ps: torch.Tensor | None  # [n] float32, 1 where disabled
    min_ps: torch.Tensor | None  # [n] float32, 0 where disabled
    all_greedy: bool
    any_greedy: bool
    use_top_k: bool
    use_top_p: bool
    use_min_p: bool
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # row -> generator of a seeded request


GREEDY = SamplingTensors(
    temperatures=None, top_ks=None, top_ps=None, min_ps=None, all_greedy=True, any_greedy=True,
    use_top_k=False, use_top_p=False, use_min_p=False,
)  # an all-greedy step needs no per-row tensors


def apply_top_k_top_p_min_p(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """Mask (to -inf) what top-k, then top-p, then min-p remove, in the order HF's warpers apply them."""
    if params.use_top_k or params.use_top_p:
        sorted_logits, sorted_index = logits.sort(dim=-1, descending=True)
        if params.use_top_k:
            ranks = torch.arange(logits.shape[-1], device=logits.device)
            sorted_logits.masked_fill_(ranks[None, :] >= params.top_ks[:, None], float("-inf"))
        if params.use_top_p:
            sorted_probs = sorted_logits.softmax(dim=-1)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            sorted_logits.masked_fill_(mass_before >= params.top_ps[:, None], float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, sorted_index, sorted_logits)
    if params.use_min_p:
        probs = logits.softmax(dim=-1)
        threshold = params.min_ps[:, None] * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """Next token id per row of ``logits`` [n, vocab], in the model's dtype or float32.

    Greedy rows and the one-pass kernel read the logits as they are (an argmax is the same in either dtype); the
    torch form works on a float32 copy.
    """
    if params.all_greedy:
        return logits.argmax(dim=-1)
    if logits.is_cuda and not (params.use_top_k or params.use_top_p or params.use_min_p or params.generators):
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=logits.device)
        return gumbel_max_sample(logits, params.temperatures, seed)
    logits = logits.float()
    greedy_tokens = logits.argmax(dim=-1) if params.any_greedy else None
    temperatures = params.temperatures.clamp_min(1e-6) if params.any_greedy else params.temperatures
    scaled = apply_top_k_top_p_min_p(logits / temperatures[:, None], params)
    probs = scaled.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for row, generator in params.generators.items():
        noise[row].exponential_(generator=generator)
    sampled = (probs / noise).argmax(dim=-1)
    if greedy_tokens is None:
        return sampled
    return torch.where(params.temperatures == 0, greedy_tokens, sampled)
