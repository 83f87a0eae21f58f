"""One request's tokens and state as the scheduler, block manager and runner see it."""
from __future__ import annotations

import enum
import time
from collections.abc import Collection
from itertools import count

from hf_minivllm.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos or a stop token
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"  # the caller left, or something failed (``Sequence.error`` says what)


class Sequence:
    """Prompt plus generated tokens, the KV blocks holding them, and how far the KV cache has been filled.

    ``num_computed_tokens`` counts tokens whose K/V are in the cache (prefix-cache hits included);
    ``num_cached_tokens`` counts those that came from the prefix cache on the last admission;
    ``num_hashed_blocks`` counts leading blocks whose hashes are published to the prefix cache;
    ``num_pending_tokens`` counts tokens sampled by a step still running on the device (async scheduling): they
    are not in ``token_ids`` yet, but the KV cache already makes room for them (``num_tokens``).
    """

    _ids = count()

    def __init__(self, token_ids: list[int], sampling_params: SamplingParams, block_size: int):
        self.seq_id = next(Sequence._ids)
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.last_token = self.token_ids[-1]
        self.num_prompt_tokens = len(self.token_ids)
        self.block_size = block_size
        self.sampling_params = sampling_params
        self.block_table: list[int] = []
        self.block_table_version = 0  # bumped by every new table (admission, recompute): copies of it check this
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.num_hashed_blocks = 0
        self.num_pending_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.error: BaseException | None = None  # why an aborted request failed, raised to its caller
        self.cache_epoch = 0  # the block manager's prefix-cache epoch when the blocks were allocated
        self.long_rope = False  # LongRoPE models: rotated with the long table (see Scheduler._switch_to_long_rope)
        # LongRoPE: what HF adds to this sequence's length when it picks the table for its batch (its longest
        # prompt's excess over this one in a drop-in generate call; 0 for requests served on their own).
        self.rope_length_offset = 0
        # With SamplingParams.logprobs: per generated token, (its log-probability, {token id: log-probability}).
        self.logprobs: list[tuple[float, dict[int, float]]] | None = [] if sampling_params.logprobs is not None else None
        self.arrival_time = time.monotonic()
        self.first_scheduled_time: float | None = None  # when its first prefill was scheduled (queue time ends)
        self.token_times: list[float] | None = None  # when each token reached the host (recorded when asked for)
        self.generator = None  # torch.Generator of a seeded request, made on first use by the runner

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        """Known plus pending tokens: what the KV cache holds once the steps in flight are done."""
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_blocks(self) -> int:
        return (self.num_tokens + self.block_size - 1) // self.block_size

    def block_tokens(self, index: int) -> list[int]:
        return self.token_ids[index * self.block_size : (index + 1) * self.block_size]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.last_token = token_id


def answer_token_ids(completion: list[int], finish_reason: FinishReason | None, params: SamplingParams,
                     eos_token_ids: Collection[int]) -> list[int]:
    """The completion tokens whose text is the answer: as in vLLM, the eos or stop token that ended a request adds
    no text (it still counts as generated and keeps its logprob). A step hook's stop ends on any token: kept."""
    if finish_reason is FinishReason.STOP and completion:
        last = completion[-1]
        if last in params.stop_token_ids or (not params.ignore_eos and last in eos_token_ids):
            return completion[:-1]
    return completion
