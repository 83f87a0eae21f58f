"""Per-request sampling settings, validated up front so bad input fails before any work starts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from hf_minivllm.engine.sequence import Sequence


MAX_LOGPROBS = 20  # the most alternatives per token a request may ask for (OpenAI's top_logprobs limit)
# What torch.Generator.manual_seed accepts; integers the engine puts in int64 tensors stay below _INT64_LIMIT.
SEED_RANGE = (-(2**63), 2**64 - 1)
_INT64_LIMIT = 2**63


@runtime_checkable
class StepHook(Protocol):
    """Per-step code a request can carry (``SamplingParams.step_hook``), e.g. HF logits processors and stopping
    criteria. Requests that share one hook object are handed to it together, once per step. A hook whose class sets
    ``lockstep = True`` has its requests stepped together where the engine can (see ``engine/scheduler.py``): each
    step then hands it all of them, at the same length.
    """

    def process_logits(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """Return the scores to sample from for ``seqs`` (float32 ``[len(seqs), vocab]``, on the engine's device).

        Each sequence's ``token_ids`` end just before the token being sampled. Called before the engine's own
        ``min_tokens`` suppression and sampling filters.
        """
        ...

    def should_stop(self, seqs: list[Sequence]) -> list[bool]:
        """Called after each of ``seqs`` got a new token (its last ``token_ids`` entry); True finishes that request."""
        ...


# Temperatures under this decode greedily (see SamplingParams).
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """How one request is decoded.

    ``temperature=0`` means greedy, and so does one under ``GREEDY_BELOW``: its draw is the argmax in all but name,
    and logits divided by a much smaller one overflow float32, leaving no distribution to draw from. ``top_k <= 0``
    (or -1) disables top-k; ``top_p=1`` and ``min_p=0`` disable those filters. ``seed`` makes this request's
    sampling independent of every other request and of the global RNG.
    ``stop_token_ids`` end the request like the model's eos does (the stop token is kept in ``token_ids`` and, as
    in vLLM, left out of the text); ``min_tokens`` suppresses eos and stop tokens until that many tokens were
    generated. ``logprobs=k`` records, for every generated token, its log-probability and the ``k`` most likely
    tokens' (``k=0``: the token's alone), under the model's own distribution (before temperature and filters), in
    ``Sequence.logprobs``. ``step_hook`` (a ``StepHook``) runs on this request's logits every step and may end
    it; the common path pays nothing for it.
    """

    temperature: float = 1.0
    max_tokens: int = 64
    ignore_eos: bool = False
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    min_tokens: int = 0
    logprobs: int | None = None
    step_hook: StepHook | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if not isinstance(self.temperature, (int, float)) or self.temperature != self.temperature or self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens <= 0:
            raise ValueError(f"SamplingParams.max_tokens must be an integer > 0, got {self.max_tokens!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not -1 <= self.top_k < _INT64_LIMIT:
            raise ValueError(f"SamplingParams.top_k must be an integer >= 1, or 0/-1 to disable it, got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.min_p, (int, float)) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise ValueError(f"SamplingParams.seed must be None or an integer in [-2**63, 2**64 - 1], got {self.seed!r}")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 0:
            raise ValueError(f"SamplingParams.min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"SamplingParams.min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"SamplingParams.logprobs must be None or an integer in [0, {MAX_LOGPROBS}], "
                             f"got {self.logprobs!r}")
        if isinstance(self.stop_token_ids, int):
            self.stop_token_ids = [self.stop_token_ids]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < _INT64_LIMIT for t in self.stop_token_ids):
            raise ValueError(
                f"SamplingParams.stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}"
            )
        if self.step_hook is not None and not isinstance(self.step_hook, StepHook):
            raise ValueError(
                "SamplingParams.step_hook must have process_logits(seqs, logits) and should_stop(seqs) methods, "
                f"got {type(self.step_hook).__name__}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW
