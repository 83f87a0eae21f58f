"""Continuous batching: which sequences run in the next step, and how many tokens each computes.

With mixed steps (``Config.mixed_steps``, the default) every step first gives each running sequence its next token,
then fills the rest of the token budget (``max_num_batched_tokens``) with waiting prompts, first come first served,
each computing its uncached prompt tokens (the last one admitted may get only a chunk): a prompt arriving never
stalls running requests, it is prefilled in chunks beside them in the same forward pass. Without mixed steps a step
is either a prefill step (prefill goes first whenever something waits and fits) or a decode step. When no free
block is left for a running sequence, the newest running sequence is preempted: its blocks are freed and it goes
back to the head of the queue to be recomputed first, so the oldest requests always make progress.

With async scheduling a step is scheduled while the previous one still runs: a sequence's token from that step is
pending (``Sequence.num_pending_tokens``), its position and KV slot are known all the same, and only a sequence that
that token is sure to finish (its length limits) sits a decode step out. The engine reads back the step in flight
right after queueing the next one, so a sequence preempted while its token was pending knows that token before any
later step can recompute it.

Requests sharing a step hook that asks for ``lockstep`` (one ``generate`` call's rows under HF's logits processors)
are stepped together, as HF's loop steps its batch: each computes its prompt but the last token, and they take
their last prompt token and every later one in the same steps, so the hook sees the whole batch once per step.
When a member cannot be admitted (no free block or sequence slot) while the others hold theirs, or nothing else
could run, the rows go on separately (the hook then sees them in groups of equal length, possibly in one step each).

The KV cache may hold fewer blocks than it could (sized to the work in hand): when a sequence does not fit, the
scheduler first asks ``grow`` for more blocks, enough for every unfinished request's longest possible length, and
only waits or preempts when the cache cannot grow (its cap, or no free device memory).
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from hf_minivllm.config import Config
from hf_minivllm.engine.block_manager import BlockManager
from hf_minivllm.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """The sequences of one step; ``num_new_tokens[i]`` tokens of ``seqs[i]`` are computed from its
    ``num_computed_tokens`` on. ``sample[i]`` says whether that sequence gets a new token from this step.
    A mixed step's first ``num_decode`` sequences are running ones computing their one decode token.
    ``has_step_hooks`` is set by the engine while any request carries a ``SamplingParams.step_hook``, so the runner
    looks for hooks only then."""

    seqs: list[Sequence]
    is_prefill: bool
    num_new_tokens: list[int]
    sample: list[bool]
    has_step_hooks: bool = False
    has_logprobs: bool = False  # some request in the engine wants logprobs (the runner looks for them only then)
    num_decode: int = 0

    def part(self, start: int, stop: int | None, is_prefill: bool) -> ScheduledBatch:
        """Rows ``start:stop`` as a batch of their own (a mixed step's decode or prefill part)."""
        return ScheduledBatch(self.seqs[start:stop], is_prefill, self.num_new_tokens[start:stop],
                              self.sample[start:stop], self.has_step_hooks, self.has_logprobs)


# Grows the KV cache to at least the first number of blocks (aiming at the second); returns the blocks it now has.
GrowKVCache = Callable[[int, int], int]


class Scheduler:
    def __init__(self, config: Config, num_blocks: int, eos_token_ids: list[int], capacity_blocks: int | None = None,
                 grow: GrowKVCache | None = None, rope_long_after: int | None = None):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.mixed_steps = config.mixed_steps
        self.eos_token_ids = frozenset(eos_token_ids)
        self.block_manager = BlockManager(num_blocks, config.kvcache_block_size, config.enable_prefix_caching)
        self.capacity_blocks = max(capacity_blocks or num_blocks, num_blocks)
        self._grow = grow
        self._growth_blocked = False  # the last growth fell short; retried once a request finishes
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0
        self.rope_long_after = rope_long_after  # LongRoPE models: the original context length
        self._gang_sizes: dict[int, int] = {}  # id of a lockstep hook -> its unfinished requests
        self._broken_gangs: set[int] = set()  # lockstep hooks whose requests go on separately
        self._held_gangs: set[int] = set()  # this step: gangs whose running members wait for a member not running
        self._prefill_blocked = False  # this step: a waiting prompt found no free block or sequence slot
        self._joined_without_compute = False  # this step: a gang member had nothing to prefill and joined at once

    @property
    def watermark_blocks(self) -> int:
        """~1% of blocks kept free when admitting, so freshly admitted sequences are not preempted at once."""
        return self.block_manager.num_blocks // 100

    def max_tokens_that_fit(self) -> int:
        """The longest sequence (prompt + generated) that the whole KV cache can hold once grown to its cap."""
        return self.capacity_blocks * self.block_manager.block_size

    def _demand_blocks(self) -> int:
        """Blocks every unfinished request would hold at its longest (prompt + max_tokens, within max_model_len)."""
        manager = self.block_manager
        return sum(
            manager.blocks_needed(min(seq.num_prompt_tokens + seq.sampling_params.max_tokens, self.max_model_len))
            for queue in (self.running, self.waiting) for seq in queue
        )

    def _try_grow(self, short: int) -> bool:
        """Ask for ``short`` more free blocks (sized for the whole demand); whether they are there now."""
        manager = self.block_manager
        if self._grow is None or self._growth_blocked or manager.num_blocks >= self.capacity_blocks:
            return False
        needed = manager.num_blocks + short
        total = self._grow(needed, max(needed, self._demand_blocks()))
        if total > manager.num_blocks:
            manager.grow(total)
        self._growth_blocked = total < needed
        return not self._growth_blocked

    def add(self, seq: Sequence) -> None:
        hook = seq.sampling_params.step_hook
        if getattr(hook, "lockstep", False):
            self._gang_sizes[id(hook)] = self._gang_sizes.get(id(hook), 0) + 1
        self.waiting.append(seq)

    def _gang(self, seq: Sequence) -> int | None:
        """The lockstep gang ``seq`` steps with (its hook's id), None when it steps on its own."""
        key = id(seq.sampling_params.step_hook)
        return key if key in self._gang_sizes and key not in self._broken_gangs else None

    def _leave_gang(self, seq: Sequence) -> None:
        key = id(seq.sampling_params.step_hook)
        if key in self._gang_sizes:
            self._gang_sizes[key] -= 1
            if not self._gang_sizes[key]:
                del self._gang_sizes[key]
                self._broken_gangs.discard(key)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        """The next step; None when nothing is left to schedule before the step in flight is read back."""
        self._switch_to_long_rope()
        self._held_gangs.clear()
        self._prefill_blocked = self._joined_without_compute = False
        if self.mixed_steps:
            batch = self._schedule_mixed()
        else:
            batch = self._schedule_prefill()
            if batch is None:
                batch = self._schedule_decode()
        if batch is None and self._joined_without_compute:  # the last member joined its gang: they may step now
            self._held_gangs.clear()
            batch = self._schedule_decode()
        if self._held_gangs:  # those whose missing members did not join in this step's prefill
            self._held_gangs &= {key for key, step in self._gang_steps().items() if step is None}
        if self._held_gangs and (self._prefill_blocked or batch is None):
            # A member cannot get in while the others hold their blocks and slots (or nothing else could run):
            # waiting for it could wait forever, so these rows go on separately from now on.
            self._broken_gangs |= self._held_gangs
            if batch is None:
                batch = self._schedule_decode()
        return batch

    def _schedule_mixed(self) -> ScheduledBatch | None:
        """Running sequences' decode tokens first, then waiting prompts in the budget left (one forward pass)."""
        decode = self._schedule_decode()
        decoded = len(decode.seqs) if decode is not None else 0
        prefill = self._schedule_prefill(self.max_num_batched_tokens - decoded) if self.waiting else None
        if prefill is None:
            return decode
        if decode is None:
            return prefill
        return ScheduledBatch(decode.seqs + prefill.seqs, True, decode.num_new_tokens + prefill.num_new_tokens,
                              decode.sample + prefill.sample, num_decode=len(decode.seqs))

    def _schedule_prefill(self, budget: int | None = None) -> ScheduledBatch | None:
        seqs: list[Sequence] = []
        num_new_tokens: list[int] = []
        sample: list[bool] = []
        budget = self.max_num_batched_tokens if budget is None else budget
        manager = self.block_manager
        whole_gangs: set[int] = set()  # gangs admitted whole in this step: they sample as they finish prefilling
        # A prompt prefilled whole joins ``running`` at once; a chunked one ends the loop: so ``running`` counts the
        # sequence slots taken.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            gang = self._gang(seq)
            if gang is not None and gang not in whole_gangs and self._fits_whole(gang, budget, bool(seqs)):
                whole_gangs.add(gang)
            if gang in whole_gangs:
                gang = None
            if seq.num_pending_tokens:
                # Preempted in this very step (a mixed step decodes first) while its last token is still on the
                # device: recomputing it now would sample that position a second time. It goes first next step.
                break
            if not seq.block_table:
                if self._outgrew_short_rope(seq):  # a long prompt, or a sequence preempted past the switch
                    seq.long_rope = True  # before any prefix-cache lookup: its blocks have their own namespace
                reserve = self.watermark_blocks if self.running or seqs else 0
                short = manager.blocks_short(seq, reserve)
                if short > 0 and not self._try_grow(short):
                    self._prefill_blocked = True
                    break
                manager.allocate(seq)
                if seq.first_scheduled_time is None:
                    seq.first_scheduled_time = time.monotonic()
            # A gang member prefilled apart from some of its gang leaves its last prompt token to the step in which
            # the whole gang takes a token.
            remaining = len(seq) - (gang is not None) - seq.num_computed_tokens
            if remaining:
                chunk = min(remaining, budget)
                budget -= chunk
                manager.publish(seq, seq.num_computed_tokens + chunk)
                seqs.append(seq)
                num_new_tokens.append(chunk)
                sample.append(chunk == remaining and gang is None)
                if chunk < remaining:
                    break
            else:
                self._joined_without_compute = True
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        if self.waiting and len(self.running) >= self.max_num_seqs:
            self._prefill_blocked = True
        if not seqs:
            return None
        return ScheduledBatch(seqs, True, num_new_tokens, sample)

    def _fits_whole(self, gang: int, budget: int, admitted_some: bool) -> bool:
        """Whether the gang's members, all waiting at the queue's head, fit this step whole: every prompt token
        (cache hits not counted), sequence slots and KV blocks (growing the cache as admitting them would)."""
        members = []
        for seq in self.waiting:
            if self._gang(seq) != gang:
                break
            members.append(seq)
        if len(members) != self._gang_sizes[gang] or any(seq.num_pending_tokens for seq in members):
            return False
        if sum(len(seq) - seq.num_computed_tokens for seq in members) > budget:
            return False
        if len(self.running) + len(members) > self.max_num_seqs:
            return False
        manager = self.block_manager
        reserve = self.watermark_blocks if self.running or admitted_some else 0
        short = reserve + sum(seq.num_blocks - len(seq.block_table) for seq in members) - manager.num_free_blocks
        return short <= 0 or self._try_grow(short)

    def _schedule_decode(self) -> ScheduledBatch | None:
        if not self.running:
            return None  # every sequence finished while the step in flight ran
        manager = self.block_manager
        candidates = deque(self.running)  # ``running`` stays whole meanwhile, so growth sees the whole demand
        scheduled: list[Sequence] = []
        kept: list[Sequence] = []  # running sequences in their order: scheduled ones and those sitting out
        gang_steps = self._gang_steps() if self._gang_sizes else {}
        while candidates:
            seq = candidates.popleft()
            if self._finishes_when_pending_arrive(seq) or (gang_steps and not self._may_step(seq, gang_steps)):
                kept.append(seq)
                continue
            while not manager.can_append(seq) and not self._try_grow(1):
                if self._release_partial_prefill():
                    continue
                if candidates:
                    self._preempt(candidates.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                manager.append_slot(seq)
                scheduled.append(seq)
                kept.append(seq)
        self.running = deque(kept)
        if gang_steps:
            # A member preempted above leaves its gang short: the members already scheduled wait for it as well.
            short = {key for key, step in self._gang_steps().items() if step is None}
            self._held_gangs |= short
            scheduled = [seq for seq in scheduled if self._gang(seq) not in short]
        for seq in scheduled:  # not before: a block is published once the step that writes it is certain
            manager.publish(seq, len(seq))
        if not scheduled:
            assert kept, "a single sequence must always fit: requests are checked against the KV cache size"
            return None
        return ScheduledBatch(scheduled, False, [1] * len(scheduled), [True] * len(scheduled))

    def _gang_steps(self) -> dict[int, int | None]:
        """Per lockstep gang with running members: how many tokens its members that may take one now have generated
        (the fewest of any member, so one behind catches up), or None while some member is not running."""
        running: dict[int, int] = {}
        fewest: dict[int, int] = {}
        for seq in self.running:
            key = self._gang(seq)
            if key is not None:
                running[key] = running.get(key, 0) + 1
                generated = seq.num_completion_tokens + seq.num_pending_tokens
                fewest[key] = min(fewest.get(key, generated), generated)
        return {key: fewest[key] if count == self._gang_sizes[key] else None for key, count in running.items()}

    def _may_step(self, seq: Sequence, gang_steps: dict[int, int | None]) -> bool:
        """Whether running ``seq`` may take a token this step (always, unless its gang holds it back)."""
        key = self._gang(seq)
        if key is None:
            return True
        step = gang_steps[key]
        if step is None:
            self._held_gangs.add(key)
            return False
        return seq.num_completion_tokens + seq.num_pending_tokens == step

    def _release_partial_prefill(self) -> bool:
        """Free the blocks of the prompt being prefilled in chunks (it waits at the queue's head holding all of its
        prompt's blocks) before a running request gives up its own: the running one has generated tokens, the
        prompt only part of its KV, and without this a cache that fits each request alone could starve them both.
        The prompt starts over (its cached prefix blocks stay reusable); counted as a preemption."""
        if not self.waiting or not self.waiting[0].block_table or self.waiting[0].num_pending_tokens:
            return False
        self.num_preemptions += 1
        self.block_manager.deallocate(self.waiting[0])
        return True

    def _finishes_when_pending_arrive(self, seq: Sequence) -> bool:
        """Whether ``seq``'s pending tokens bring it to max_tokens or max_model_len (so no step may follow)."""
        if not seq.num_pending_tokens:
            return False
        completion = seq.num_completion_tokens + seq.num_pending_tokens
        return completion >= seq.sampling_params.max_tokens or seq.num_tokens >= self.max_model_len

    def _outgrew_short_rope(self, seq: Sequence) -> bool:
        """LongRoPE (Phi-3): whether ``seq`` must now be rotated with the long table but is not yet. HF picks the
        table by the longest sequence of the forward pass (its batch: ``rope_length_offset``) and, once that
        outgrows the original context, drops its cache and recomputes the whole batch with the long table."""
        return (self.rope_long_after is not None and not seq.long_rope
                and seq.num_tokens + seq.rope_length_offset > self.rope_long_after)

    def _switch_to_long_rope(self) -> None:
        """Running sequences that outgrew the original context are recomputed with the long table: preempted, they
        are recomputed first (counted as preemptions). One whose pending token finishes it needs no recompute."""
        if self.rope_long_after is None:  # every other model: no pass over the running sequences each step
            return
        outgrown = [seq for seq in self.running
                    if self._outgrew_short_rope(seq) and not self._finishes_when_pending_arrive(seq)]
        if outgrown:
            # They go before the queue's head: a prompt prefilled in chunks there gives its blocks back first, or it
            # would hold them behind the recomputes (only the head's blocks are ever released) and starve them.
            self._release_partial_prefill()
        for seq in outgrown:
            seq.long_rope = True
            self.running.remove(seq)
            self._preempt(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)

    def mark_launched(self, batch: ScheduledBatch, tokens_pending: bool) -> None:
        """The step's tokens are computed (their K/V written) by the time any later step runs; with
        ``tokens_pending`` its sampled tokens stay on the device until ``postprocess``."""
        for seq, count, sampled in zip(batch.seqs, batch.num_new_tokens, batch.sample):
            seq.num_computed_tokens += count
            if sampled and tokens_pending:
                seq.num_pending_tokens += 1

    def postprocess(self, batch: ScheduledBatch, token_ids: list[int | None]) -> tuple[list[Sequence], list[Sequence]]:
        """Append this step's sampled tokens; returns the sequences that got one and those that finished.

        A sequence that finished while the step ran (its previous token was eos) drops the token: the step computed
        it only because it was scheduled before that was known.
        """
        updated, finished = [], []
        for seq, token_id in zip(batch.seqs, token_ids):
            if token_id is None or seq.is_finished:
                continue
            if seq.num_pending_tokens:
                seq.num_pending_tokens -= 1
            seq.append_token(token_id)
            updated.append(seq)
            reason = self._finish_reason(seq, token_id)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return updated, finished

    def abort(self, seq: Sequence, error: BaseException | None = None) -> None:
        """End an unfinished sequence now, without a new token (its caller left, or its step hook raised)."""
        seq.error = error
        self.finish(seq, FinishReason.ABORT)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence now (its last token was sampled) and free its blocks.

        The sequence may be waiting: preempted while its last token was pending.
        """
        queue = self.running if seq.status == SequenceStatus.RUNNING else self.waiting
        queue.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.num_pending_tokens = 0
        self._leave_gang(seq)
        if seq.block_table:
            self.block_manager.deallocate(seq)
        self._growth_blocked = False

    def _finish_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        params = seq.sampling_params
        if seq.num_completion_tokens >= params.min_tokens:
            if (not params.ignore_eos and token_id in self.eos_token_ids) or token_id in params.stop_token_ids:
                return FinishReason.STOP
        if seq.num_completion_tokens >= params.max_tokens or len(seq) >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def abort_all(self, error: BaseException | None = None) -> list[Sequence]:
        """End every unfinished sequence with ``error`` and free its blocks (used when a step raised)."""
        dropped = list(self.running) + list(self.waiting)
        for seq in dropped:
            self.abort(seq, error)
        return dropped

    def preempt_all(self) -> None:
        """Send every running sequence back to the queue to be recomputed (its tokens so far are kept)."""
        while self.running:
            self._preempt(self.running.pop())
