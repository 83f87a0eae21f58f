"""Continuous batching: which sequences run in the next step, and how many tokens each computes.

A step is either a prefill step (waiting sequences, first come first served, each computing its uncached prompt
tokens; the last one admitted may get only a chunk when the token budget runs out) or a decode step (every running
sequence computes one token). Prefill goes first whenever something waits and fits. When a decode step finds no
free block for a sequence, the newest running sequence is preempted: its blocks are freed and it goes back to the
head of the queue to be recomputed later, so the oldest requests always make progress.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from hf_minivllm.config import Config
from hf_minivllm.engine.block_manager import BlockManager
from hf_minivllm.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """The sequences of one step; ``num_new_tokens[i]`` tokens of ``seqs[i]`` are computed from its
    ``num_computed_tokens`` on. ``sample[i]`` says whether that sequence gets a new token from this step.
    ``has_step_hooks`` is set by the engine while any request carries a ``SamplingParams.step_hook``, so the runner
    looks for hooks only then."""

    seqs: list[Sequence]
    is_prefill: bool
    num_new_tokens: list[int]
    sample: list[bool]
    has_step_hooks: bool = False


class Scheduler:
    def __init__(self, config: Config, num_blocks: int, eos_token_ids: list[int]):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.block_manager = BlockManager(num_blocks, config.kvcache_block_size, config.enable_prefix_caching)
        # Keep ~1% of blocks free when admitting, so freshly admitted sequences are not preempted at once.
        self.watermark_blocks = num_blocks // 100
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def max_tokens_that_fit(self) -> int:
        """The longest sequence (prompt + generated) that the whole KV cache can hold."""
        return self.block_manager.num_blocks * self.block_manager.block_size

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = self._schedule_prefill()
        if batch is None:
            batch = self._schedule_decode()
        return batch

    def _schedule_prefill(self) -> ScheduledBatch | None:
        seqs: list[Sequence] = []
        num_new_tokens: list[int] = []
        sample: list[bool] = []
        budget = self.max_num_batched_tokens
        manager = self.block_manager
        while self.waiting and budget > 0 and len(self.running) + len(seqs) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                reserve = self.watermark_blocks if self.running or seqs else 0
                if not manager.can_allocate(seq, reserve):
                    break
                manager.allocate(seq)
            remaining = len(seq) - seq.num_computed_tokens
            chunk = min(remaining, budget)
            budget -= chunk
            manager.publish(seq, seq.num_computed_tokens + chunk)
            seqs.append(seq)
            num_new_tokens.append(chunk)
            sample.append(chunk == remaining)
            if chunk < remaining:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        if not seqs:
            return None
        return ScheduledBatch(seqs, True, num_new_tokens, sample)

    def _schedule_decode(self) -> ScheduledBatch:
        manager = self.block_manager
        scheduled: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            while not manager.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                manager.append_slot(seq)
                manager.publish(seq, len(seq))
                scheduled.append(seq)
        self.running.extendleft(reversed(scheduled))
        assert scheduled, "a single sequence must always fit: requests are checked against the KV cache size"
        return ScheduledBatch(scheduled, False, [1] * len(scheduled), [True] * len(scheduled))

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)

    def postprocess(self, batch: ScheduledBatch, token_ids: list[int | None]) -> list[Sequence]:
        """Advance the scheduled sequences by this step's results; returns those that finished."""
        finished = []
        for seq, count, token_id in zip(batch.seqs, batch.num_new_tokens, token_ids):
            seq.num_computed_tokens += count
            if token_id is None:
                continue
            seq.append_token(token_id)
            reason = self._finish_reason(seq, token_id)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a running sequence now (its last token was sampled) and free its blocks."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.deallocate(seq)
        self.running.remove(seq)

    def _finish_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        params = seq.sampling_params
        if seq.num_completion_tokens >= params.min_tokens:
            if (not params.ignore_eos and token_id in self.eos_token_ids) or token_id in params.stop_token_ids:
                return FinishReason.STOP
        if seq.num_completion_tokens >= params.max_tokens or len(seq) >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def abort_all(self) -> list[Sequence]:
        """Drop every unfinished sequence and free its blocks (used when a step raised)."""
        dropped = list(self.running) + list(self.waiting)
        for seq in dropped:
            if seq.block_table:
                self.block_manager.deallocate(seq)
            seq.status = SequenceStatus.FINISHED
        self.running.clear()
        self.waiting.clear()
        return dropped
