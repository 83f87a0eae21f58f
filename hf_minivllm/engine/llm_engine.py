"""The step loop: requests in, scheduler decides, runner computes, finished sequences out.

With ``Config.async_scheduling`` each step is scheduled and queued on the device before the previous step's tokens
are read back, so the host's per-step work overlaps the device's. The loop falls back to one step at a time while a
request carries a step hook (HF processors and stopping criteria need every token on the host).
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence as SequenceOf
from contextlib import AbstractContextManager, ExitStack, closing, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from hf_minivllm.config import Config
from hf_minivllm.engine.model_runner import LaunchedStep, ModelRunner, TensorParallelPeers
from hf_minivllm.engine.scheduler import Scheduler
from hf_minivllm.engine.sequence import FinishReason, Sequence
from hf_minivllm.engine.stats import EngineStats
from hf_minivllm.layers.sampler import NO_DISTRIBUTION
from hf_minivllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
# Device types whose autocast a caller's thread may have on (torch keeps it per thread and per device type).
_AUTOCAST_DEVICE_TYPES = ("cuda", "cpu")


class EngineClosed(RuntimeError):
    """The engine was closed (``LLM.close``, ``hf_minivllm.restore``) before or while a request ran."""


@dataclass
class StepResult:
    """What one step did: sequences that got a token (``updated``), those that finished, and token counts."""

    updated: list[Sequence]
    finished: list[Sequence]
    is_prefill: bool
    num_tokens: int


class LLMEngine:
    """Continuous-batching engine over a compact decoder (see ``hf_minivllm.models``).

    Not thread-safe by itself: one thread steps it (``hf_minivllm.engine.loop.EngineLoop`` for many callers).
    ``workers``: the other ranks of a tensor-parallel ``model`` (``hf_minivllm.tp``), whose runners follow this one's.
    """

    def __init__(self, model: nn.Module, config: Config, eos_token_ids: SequenceOf[int],
                 workers: TensorParallelPeers | None = None):
        self.config = config
        self.workers = workers
        self.eos_token_ids = list(eos_token_ids)
        self.stats = EngineStats()
        self.num_hooked_requests = 0  # unfinished requests with a SamplingParams.step_hook
        self.num_logprob_requests = 0  # unfinished requests with SamplingParams.logprobs
        self.in_flight: LaunchedStep | None = None  # a step queued ahead, its tokens not read back yet
        self.closed = False
        self._unreported: list[StepResult] = []  # results completed outside step() (a reload), for its caller
        self._autocast_noted = False
        self._start(model)

    def _start(self, model: nn.Module) -> None:
        """A runner and scheduler for ``model``, swapped in together once both exist (callers on other threads
        read the scheduler's capacity while validating)."""
        with self._autocast_off():
            runner = ModelRunner(model, self.config, self.eos_token_ids, self.workers)
        # The scheduler's growth callback holds the runner and the stats, not the engine: no reference cycle, so
        # an engine dropped without close() frees its KV cache at once, not whenever the garbage collector runs.
        scheduler = Scheduler(self.config, runner.num_blocks, self.eos_token_ids,
                              capacity_blocks=runner.capacity_blocks,
                              grow=functools.partial(_grow_kv_cache, runner, self.stats),
                              rope_long_after=getattr(model, "rope_long_after", None))
        self.model, self.runner, self.scheduler = model, runner, scheduler
        self.stats.kv_cache_peak_blocks = max(self.stats.kv_cache_peak_blocks, runner.num_blocks)

    def _autocast_off(self) -> AbstractContextManager:
        """The caller's ``torch.autocast`` turned off for the engine's work. Whoever waits for results drives the
        engine, so under the caller's autocast a step would compute in the autocast dtype or not depending on the
        thread that runs it, beside KV and CUDA graphs computed in the model's dtype (and the kernels refuse the
        mix). The engine computes in the model's dtype, as ``accelerate`` built it, whoever drives."""
        enabled = [kind for kind in _AUTOCAST_DEVICE_TYPES if torch.is_autocast_enabled(kind)]
        if not enabled:
            return nullcontext()
        if not self._autocast_noted:
            self._autocast_noted = True
            logger.warning("torch.autocast is on (%s) where the engine runs: the engine computes in the model's "
                           "dtype as if it were off (HF's generate would compute in the autocast dtype); cast the "
                           "model to that dtype to generate in it", ", ".join(enabled))
        stack = ExitStack()
        for kind in enabled:
            stack.enter_context(torch.autocast(kind, enabled=False))
        return stack

    @property
    def max_sequence_tokens(self) -> int:
        return min(self.config.max_model_len, self.scheduler.max_tokens_that_fit())

    def validate_request(self, prompt_token_ids: SequenceOf[int], params: SamplingParams, index: int = 0) -> None:
        """Raise ValueError if the request is malformed or could never fit (checked before any work starts)."""
        if self.closed:
            raise EngineClosed("this engine is closed (or could not rebuild its decoder); make a new one")
        where = f"prompt {index}"
        if not isinstance(params, SamplingParams):
            raise ValueError(f"{where}: sampling_params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        if len(prompt_token_ids) == 0:
            raise ValueError(f"{where} is empty: a prompt needs at least one token")
        vocab = self.model.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"{where}: token ids must be integers in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise ValueError(f"{where}: stop_token_ids must be token ids in [0, {vocab}), got {params.stop_token_ids}")
        limit = self.config.max_model_len
        if len(prompt_token_ids) >= limit:
            raise ValueError(
                f"{where} has {len(prompt_token_ids)} tokens; max_model_len={limit} leaves no room to generate "
                f"(prompts must be shorter than max_model_len)"
            )
        needed = min(len(prompt_token_ids) + params.max_tokens, limit)
        capacity = self.scheduler.max_tokens_that_fit()
        if needed > capacity:
            raise ValueError(
                f"{where} needs up to {needed} tokens of KV cache but the whole cache holds {capacity}; "
                "lower max_tokens or give the cache more blocks"
            )

    def new_sequences(self, prompts: SequenceOf[SequenceOf[int]], params: SequenceOf[SamplingParams]) -> list[Sequence]:
        """Validate every request, then make its sequence (not queued yet); safe from any thread."""
        if len(prompts) != len(params):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        for index, (prompt, sp) in enumerate(zip(prompts, params)):
            self.validate_request(prompt, sp, index)
        return [Sequence(list(prompt), sp, self.config.kvcache_block_size) for prompt, sp in zip(prompts, params)]

    def add_sequences(self, seqs: SequenceOf[Sequence]) -> None:
        """Queue sequences made by ``new_sequences``, in order."""
        for seq in seqs:
            self.scheduler.add(seq)
            if seq.sampling_params.step_hook is not None:
                self.num_hooked_requests += 1
            if seq.sampling_params.logprobs is not None:
                self.num_logprob_requests += 1
            self.stats.requests += 1
            self.stats.prompt_tokens += len(seq)

    def add_request(self, prompt_token_ids: SequenceOf[int], params: SamplingParams) -> Sequence:
        return self.add_requests([prompt_token_ids], [params])[0]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self.in_flight is not None

    def add_requests(self, prompts: SequenceOf[SequenceOf[int]], params: SequenceOf[SamplingParams]) -> list[Sequence]:
        """Queue requests in order; every one is validated before the first is queued, so a bad one changes nothing."""
        seqs = self.new_sequences(prompts, params)
        self.add_sequences(seqs)
        return seqs

    def step(self) -> StepResult:
        """Launch the next step and return the result of the one before it (async scheduling), or run one step.

        The first step queued ahead returns an empty result; its tokens come with the next call.
        """
        previous, self.in_flight = self.in_flight, None
        ahead = self._may_schedule_ahead()
        batch = self.scheduler.schedule() if previous is None or ahead else None
        if batch is None:
            if previous is None:
                raise RuntimeError("the scheduler found nothing it could run although requests are waiting")
            return self._complete(previous)
        batch.has_step_hooks = self.num_hooked_requests > 0
        batch.has_logprobs = self.num_logprob_requests > 0
        if batch.is_prefill:
            self.stats.prefix_cache_hit_tokens += sum(
                seq.num_cached_tokens for seq in batch.seqs if seq.num_computed_tokens == seq.num_cached_tokens
            )
        with self._autocast_off():
            launched = self.runner.launch(batch, previous)
        self.scheduler.mark_launched(batch, tokens_pending=ahead)
        if not ahead:
            return self._complete(launched)
        self.in_flight = launched
        if previous is None:
            return StepResult([], [], False, 0)
        return self._complete(previous)

    def _may_schedule_ahead(self) -> bool:
        """Whether the next step may be scheduled before the last one's tokens are known."""
        return self.config.async_scheduling and self.num_hooked_requests == 0

    def _complete(self, launched: LaunchedStep) -> StepResult:
        """Read back a launched step's tokens and apply them: append, finish, step hooks' stop decisions.

        A request whose step hook raised, or whose logits left nothing to sample from, ends here
        (``FinishReason.ABORT``, the exception in ``Sequence.error``); the other requests of the step go on.
        """
        batch = launched.batch
        token_ids = launched.token_ids()
        failed = self._abort_failed(launched.hook_failures + _without_distribution(batch.seqs, token_ids))
        updated, finished = self.scheduler.postprocess(batch, token_ids)
        finished += failed
        if launched.logprobs is not None:
            logprobs = launched.logprobs.by_sequence()
            for seq in updated:
                if seq.seq_id in logprobs:
                    seq.logprobs.append(logprobs[seq.seq_id])
        if batch.has_step_hooks:
            finished += self._run_stop_hooks(updated)
            self.num_hooked_requests -= sum(1 for seq in finished if seq.sampling_params.step_hook is not None)
        if batch.has_logprobs:
            self.num_logprob_requests -= sum(1 for seq in finished if seq.sampling_params.logprobs is not None)
        self.stats.steps += 1
        self.stats.generated_tokens += len(updated)
        self.stats.preemptions = self.scheduler.num_preemptions
        return StepResult(updated, finished, batch.is_prefill, sum(batch.num_new_tokens))

    def _abort_failed(self, failures: list[tuple[list[Sequence], BaseException]]) -> list[Sequence]:
        aborted = []
        for seqs, error in failures:
            for seq in seqs:
                if not seq.is_finished:
                    self.scheduler.abort(seq, error)
                    aborted.append(seq)
        return aborted

    def _run_stop_hooks(self, updated: list[Sequence]) -> list[Sequence]:
        """Ask each step hook whether its requests that just got a token must stop now. Those that this token
        finished (by length or eos) are shown to the hook too, as HF calls its stopping criteria after every token,
        the last included; only the others can be stopped.

        A hook that raises aborts its own requests with that exception.
        """
        groups: dict[int, list[Sequence]] = {}
        for seq in updated:
            if seq.sampling_params.step_hook is not None and seq.finish_reason != FinishReason.ABORT:
                groups.setdefault(id(seq.sampling_params.step_hook), []).append(seq)
        stopped = []
        for seqs in groups.values():
            try:
                decisions = list(seqs[0].sampling_params.step_hook.should_stop(seqs))
            except Exception as error:  # noqa: BLE001 - the hook's own failure, handed to its caller
                stopped += self._abort_failed([(seqs, error)])
                continue
            for seq, stop in zip(seqs, decisions):
                if stop and not seq.is_finished:
                    self.scheduler.finish(seq, FinishReason.STOP)
                    stopped.append(seq)
        return stopped

    def abort(self, seqs: SequenceOf[Sequence], error: BaseException | None = None) -> None:
        """End these requests now (their caller left); their blocks go back to the pool."""
        for seq in seqs:
            if not seq.is_finished:
                if seq.sampling_params.step_hook is not None:
                    self.num_hooked_requests -= 1
                if seq.sampling_params.logprobs is not None:
                    self.num_logprob_requests -= 1
                self.scheduler.abort(seq, error)

    def abort_all(self, error: BaseException | None = None) -> list[Sequence]:
        """End every unfinished request with ``error`` (after a failed step). Blocks whose KV the failed step may
        have left unwritten could be published already, so the prefix cache is reset as well."""
        self.in_flight = None
        aborted = self.scheduler.abort_all(error)
        self.num_hooked_requests = self.num_logprob_requests = 0
        self.scheduler.block_manager.reset_prefix_cache()
        return aborted

    def reset_prefix_cache(self) -> None:
        """No KV computed so far is reused by later requests (call after changing the weights)."""
        self.scheduler.block_manager.reset_prefix_cache()

    def reload_model(self, model: nn.Module) -> None:
        """Serve a rebuilt decoder (new weight tensors, dtype or device): running requests are recomputed.

        The step in flight is read back first; then every running request goes back to the queue, the old KV cache
        and CUDA graphs are released, and a new runner (KV cache, graphs) is built for ``model``.
        """
        if self.in_flight is not None:
            launched, self.in_flight = self.in_flight, None
            self._unreported.append(self._complete(launched))
        old_scheduler, old_model = self.scheduler, self.model
        old_scheduler.preempt_all()
        for seq in old_scheduler.waiting:  # a prompt prefilled in chunks holds blocks while it waits
            if seq.block_table:
                old_scheduler.block_manager.deallocate(seq)
        self.runner.close()
        try:
            self._start(model)
        except BaseException as error:
            try:
                if self.workers is not None:
                    raise  # the workers may hold the new model's shards already: never serve a mix
                self._start(old_model)  # keep serving; the caller gets the error and the next call tries again
            except BaseException:
                self.closed = True
                aborted = list(old_scheduler.waiting)
                for seq in aborted:
                    old_scheduler.abort(seq, error)
                self._unreported.append(StepResult([], aborted, False, 0))
                raise error from None
            raise
        finally:
            if self.scheduler is not old_scheduler:
                self.scheduler.num_preemptions = old_scheduler.num_preemptions
                for seq in old_scheduler.waiting:
                    self.scheduler.add(seq)

    def take_unreported(self) -> list[StepResult]:
        """Results of steps completed outside ``step()`` (by ``reload_model``), to be reported to their callers."""
        results, self._unreported = self._unreported, []
        return results

    def release_idle_memory(self) -> None:
        """With nothing to run, hand the KV cache's memory above its floor back (on-demand caches only)."""
        if self.closed or self.has_unfinished():
            return
        floor = self.runner.shrink_kv_cache()
        if floor < self.scheduler.block_manager.num_blocks:
            self.scheduler.block_manager.shrink(floor)

    def close(self) -> None:
        """Drop every request and release the KV cache and CUDA graphs; the engine cannot be used afterwards."""
        self.abort_all()
        self.runner.close()
        self.closed = True

    def steps(self) -> Iterator[StepResult]:
        """Step until every queued request finished, yielding each step's result.

        If a step raises, or the caller stops iterating and closes the iterator, the unfinished requests are
        dropped and their blocks freed, so the engine stays usable.
        """
        try:
            while self.has_unfinished():
                yield self.step()
        except BaseException as error:
            self.abort_all(error)
            raise

    def generate(
        self,
        prompts: SequenceOf[SequenceOf[int]],
        params: SequenceOf[SamplingParams],
        on_step: Callable[[StepResult], None] | None = None,
    ) -> list[Sequence]:
        """Run ``prompts`` to completion; returns their sequences in input order (see ``add_requests``, ``steps``)."""
        seqs = self.add_requests(prompts, params)
        with closing(self.steps()) as results:
            for result in results:
                if on_step is not None:
                    on_step(result)
        return seqs


def _without_distribution(seqs: list[Sequence], token_ids: list[int | None]
                          ) -> list[tuple[list[Sequence], BaseException]]:
    """The sampled requests whose step had no distribution to draw from, each with its error (HF's sampling raises
    there too; only greedy decoding takes an argmax whatever the logits)."""
    if NO_DISTRIBUTION not in token_ids:  # every step asks: one scan in C, no Python loop over the batch
        return []
    return [([seq], RuntimeError(
        f"request {seq.seq_id}: its next-token logits hold NaN or +inf, or nothing finite once its filters and "
        "min_tokens suppression were applied, so there is no distribution to sample from (the model or its "
        "logits processors produced them; greedy decoding, temperature 0, would take their argmax)"))
        for seq, token_id in zip(seqs, token_ids) if token_id == NO_DISTRIBUTION]


def _grow_kv_cache(runner: ModelRunner, stats: EngineStats, min_blocks: int, wanted_blocks: int) -> int:
    """The scheduler's ``grow``: the runner's cache grown, counted in the engine's stats."""
    start = time.perf_counter()
    before = runner.num_blocks
    num_blocks = runner.grow_kv_cache(min_blocks, wanted_blocks)
    if num_blocks > before:
        stats.kv_cache_growths += 1
        stats.kv_cache_growth_seconds += time.perf_counter() - start
        stats.kv_cache_peak_blocks = max(stats.kv_cache_peak_blocks, num_blocks)
    return num_blocks
