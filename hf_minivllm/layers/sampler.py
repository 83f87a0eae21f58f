"""Batched token sampling on the logits' device: greedy, temperature, top-k, top-p, min-p and per-request seeds.

Everything is tensor work on the whole batch; only the host-side flags (is any row using top-k? ...) branch, so no
device-to-host sync happens per request. Sampling uses the exponential-race form of the Gumbel-max trick:
``argmax(p / E)`` with ``E ~ Exp(1)`` draws from ``p``; a seeded request draws its ``E`` from its own generator,
the others from the step's (``SamplingTensors.generator``).
On CUDA a batch with temperatures only (no top-k/top-p/min-p, no seeded request: W1's case) samples in one Triton
pass over the logits (``hf_minivllm.kernels.sampling``) instead of the ten or so passes of the torch form. A batch
whose sampled rows all keep at most ``CANDIDATES_MAX`` tokens by top-k (HF's default of 50 and the top_k of most
models' generation configs) draws from those candidates only: the top-k first, then top-p and min-p among them,
which is the same distribution as the full-vocabulary form without sorting the vocabulary (see ``tie_margin`` for
the one exception). The full-vocabulary form takes its rows a chunk at a time (``row_chunks``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from hf_minivllm.kernels.sampling import NO_DISTRIBUTION, gumbel_max_sample


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
    max_top_k: int | None = None  # the largest top_k of the sampled rows (vocab size where disabled); None: unknown
    generator: torch.Generator | None = None  # the draw of the other sampled rows; None: torch's default generator

    def rows(self, chunk: slice) -> SamplingTensors:
        """The settings of the rows in ``chunk`` (the flags stay the whole batch's: a chunk may then filter for
        nothing, which costs time, never correctness)."""
        def part(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[chunk]

        start, stop, _ = chunk.indices(len(self.temperatures))
        return replace(self, temperatures=part(self.temperatures), top_ks=part(self.top_ks), top_ps=part(self.top_ps),
                       min_ps=part(self.min_ps),
                       generators={row - start: g for row, g in self.generators.items() if start <= row < stop})


GREEDY = SamplingTensors(
    temperatures=None, top_ks=None, top_ps=None, min_ps=None, all_greedy=True, any_greedy=True,
    use_top_k=False, use_top_p=False, use_min_p=False,
)  # an all-greedy step needs no per-row tensors


# The most candidates a row's top_k may keep for sampling from the top-k alone (one torch.topk, no sort of the
# vocabulary): at 256 rows of Qwen3's 151,936 tokens, top-k 20 with top-p 0.95 took 4.9 ms through the sort on an
# H200, against 0.08 ms for temperature alone.
CANDIDATES_MAX = 1024
# The fewest candidates drawn beyond the largest top_k (see tie_margin).
TIE_MARGIN = 64


# Logits the full-vocabulary form works on at a time (``row_chunks``): 110 rows of Qwen3's 151,936 tokens.
CHUNK_ELEMENTS = 1 << 24


def row_chunks(num_rows: int, vocab_size: int) -> list[slice]:
    """Slices of at most ``CHUNK_ELEMENTS // vocab_size`` rows covering ``num_rows``.

    Whole-vocabulary temporaries (float32 copies, a sort's int64 indices) sized to each step's rows took new
    segments of PyTorch's caching allocator whenever a step had more rows than any cached block fit: at 256 rows
    of 151,936 tokens, top-p steps reserved 4.1 GiB beyond a 1.4 GiB allocated peak, and the engine ended 1.5 GiB
    over its gpu_memory_utilization budget (H200). Taken a chunk at a time they come in one size from step to step
    and the allocator reuses its blocks: reserved memory then grew 0 / 0.3 / 1.5 GiB at chunks of 2^23 / 2^24 /
    2^25 logits. The chunks cost speed: top-p at 256 rows took 5.6 / 4.7 / 4.2 ms against 3.6 ms in one chunk
    (torch sorts fewer than 128 rows by a slower path), and 4.8 ms before the sort took 16-bit logits."""
    step = max(1, CHUNK_ELEMENTS // vocab_size)
    return [slice(start, start + step) for start in range(0, num_rows, step)]


def tie_margin(max_top_k: int) -> int:
    """Candidates drawn beyond the largest top_k, so that tokens tied with a row's k-th keep their chance, as HF
    keeps them all. A row with more ties than this at its k-th loses some, from the least likely end. Simulated
    bf16 logits over 151,936 tokens tied 2-14 tokens at the k-th for k up to 50, and up to 110 at k = 1,000."""
    return max(TIE_MARGIN, max_top_k // 4)


def _mask_sorted_(sorted_logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """Top-k, then top-p, masked (to -inf, in place) in logits sorted in ascending order along the last dimension,
    tied ones by column; returns them. Both are HF's tests on HF's (and vLLM's) order, which is this one on CUDA,
    where a vocabulary's sort is stable. Top-k keeps every token at least as likely as the k-th: with logits from a
    16-bit model, tokens tied with the k-th are common, and cutting at rank k would drop some of them. Top-p drops
    tokens from the least likely end while their mass stays within ``1 - top_p``, never the last one: ties at that
    cut are as common, and HF drops the tied tokens of the lowest columns; a row at ``top_p=1`` drops only tokens of
    probability 0 (the mass before a token, summed from the likely end, reached 1 in float32 before the tail)."""
    width = sorted_logits.shape[-1]
    if params.use_top_k:
        kth = width - params.top_ks.clamp(1, width)
        sorted_logits.masked_fill_(sorted_logits < sorted_logits.gather(1, kth[:, None]), float("-inf"))
    if params.use_top_p:
        removed = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= 1 - params.top_ps[:, None]
        removed[:, -1] = False
        sorted_logits.masked_fill_(removed, float("-inf"))
    return sorted_logits


def _mask_min_p(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """Mask the tokens whose probability is under ``min_p`` times the row's largest (no-op without min-p)."""
    if not params.use_min_p:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = params.min_ps[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p_min_p(logits: torch.Tensor, temperatures: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """``logits`` divided by the rows' temperatures in float32, with what top-k, then top-p, then min-p remove masked
    to -inf (the order of HF's warpers). The sort takes the logits in their own dtype: a temperature keeps their
    order, and a 16-bit sort makes half the radix passes of a float32 one. Stable, so tied logits keep the column
    order that ``_mask_sorted_`` relies on."""
    if not (params.use_top_k or params.use_top_p):
        return _mask_min_p(logits.float() / temperatures[:, None], params)
    sorted_logits, sorted_index = logits.sort(dim=-1, stable=True)
    # In place: the sort's output is fresh, so .float() (a copy, or that output itself) is ours to change.
    kept = _mask_sorted_(sorted_logits.float().div_(temperatures[:, None]), params)
    return _mask_min_p(torch.empty_like(kept).scatter_(-1, sorted_index, kept), params)  # every column written


def _race(probs: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """Per row, the index of ``argmax(probs / E)`` with ``E ~ Exp(1)``: a draw from ``probs``; a seeded row's ``E``
    comes from its own generator."""
    noise = torch.empty_like(probs).exponential_(generator=params.generator)
    for row, generator in params.generators.items():
        noise[row].exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


def _sample_top_k_candidates(logits: torch.Tensor, temperatures: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """A draw from each row's top-k candidates (``params.max_top_k`` of them and ``tie_margin`` more, masked by the
    row's own top_k), with top-p and min-p applied among them. The candidates are put in ``_mask_sorted_``'s order
    (topk leaves tied ones in no set order): by column, then stably by value, two sorts of a few hundred columns."""
    window = params.max_top_k + tie_margin(params.max_top_k)
    values, columns = logits.topk(min(window, logits.shape[-1]), dim=-1)
    columns, by_column = columns.sort(dim=-1)
    ordered, by_value = values.gather(1, by_column).sort(dim=-1, stable=True)
    columns = columns.gather(1, by_value)
    candidates = _mask_min_p(_mask_sorted_(ordered.float() / temperatures[:, None], params), params)
    picked = _race(candidates.softmax(dim=-1), params)
    # topk ranks NaN first: the first candidate is the row's NaN, +inf or largest finite value
    return _mark_no_distribution(values[:, 0], columns.gather(1, picked[:, None]).squeeze(1))


def _sample_whole_vocabulary(logits: torch.Tensor, temperatures: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """A draw from each row's whole vocabulary, with top-k, top-p and min-p applied to it."""
    sampled = _race(apply_top_k_top_p_min_p(logits, temperatures, params).softmax(dim=-1), params)
    return _mark_no_distribution(logits.amax(dim=-1), sampled)


def _mark_no_distribution(row_max: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``tokens``, with ``NO_DISTRIBUTION`` for the rows whose largest logit ``row_max`` is NaN, +inf or -inf: their
    softmax is NaN, or they keep no token, so there is no distribution to draw from (HF's sampling raises)."""
    return torch.where(torch.isfinite(row_max), tokens, NO_DISTRIBUTION)


def sample(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """Next token id per row of ``logits`` [n, vocab], in the model's dtype or float32; -1 for a sampled row whose
    logits hold NaN or +inf, or nothing finite (``NO_DISTRIBUTION``: the caller fails its request, as HF's
    sampling raises). Greedy rows take the argmax whatever their logits, as HF's greedy search does.

    Greedy rows, the one-pass kernel, the top-k candidates' selection and the whole vocabulary's sort read the
    logits as they are (an argmax, a top-k or an order is the same in either dtype); the rest works in float32.
    """
    if logits.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    if params.all_greedy:
        return logits.argmax(dim=-1)
    if logits.is_cuda and not (params.use_top_k or params.use_top_p or params.use_min_p or params.generators):
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=logits.device, generator=params.generator)
        return gumbel_max_sample(logits, params.temperatures, seed)
    greedy_tokens = logits.argmax(dim=-1) if params.any_greedy else None
    temperatures = params.temperatures.clamp_min(1e-6) if params.any_greedy else params.temperatures
    # Seeded rows keep the full-vocabulary draw, so that a seed gives the same tokens whatever the batch around it.
    if (params.use_top_k and not params.generators and params.max_top_k is not None
            and params.max_top_k <= CANDIDATES_MAX):
        sampled = _sample_top_k_candidates(logits, temperatures, params)
    else:
        sampled = torch.cat([_sample_whole_vocabulary(logits[chunk], temperatures[chunk], params.rows(chunk))
                             for chunk in row_chunks(*logits.shape)])
    if greedy_tokens is None:
        return sampled
    return torch.where(params.temperatures == 0, greedy_tokens, sampled)
