"""AsyncLLM: the online engine. Requests arrive while the engine runs; each one streams its tokens to an asyncio task.

It sits on the same ``EngineLoop`` as ``LLM.generate`` and threaded ``model.generate`` callers: a request is a group
submitted in the background (an asyncio task cannot drive the engine, so a background thread does while such
requests are unfinished), and the loop's news callback wakes the event loop. One wake-up per event loop and step is
scheduled however many requests got tokens, so a step with hundreds of streams costs one cross-thread call.

Text is produced per choice by an incremental detokenizer; stop strings are searched in it, text that could still
become a stop string is held back, and a choice that hit one is aborted alone (the others go on).
"""
from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from hf_minivllm.engine.loop import RequestGroup
from hf_minivllm.engine.sequence import FinishReason, Sequence, answer_token_ids
from hf_minivllm.llm import LLM, IncrementalDetokenizer
from hf_minivllm.sampling_params import SEED_RANGE, SamplingParams
from hf_minivllm.serve.metrics import RequestMetrics, ServingMetrics

logger = logging.getLogger(__name__)


@dataclass
class TokenLogprob:
    """One generated token with its log-probability and the most likely alternatives (``logprobs=k``)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class ChoiceDelta:
    """What one choice (of ``n``) gained since its last event: text, token ids, their logprobs when asked for.
    ``finish_reason`` ("stop", "length" or "abort") is set on its last event."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    """One event of ``AsyncLLM.generate``: the choices that changed. The last event has ``finished=True``,
    ``metrics`` and every choice's finish reason."""

    request_id: str
    num_prompt_tokens: int
    choices: list[ChoiceDelta]
    finished: bool = False
    num_completion_tokens: int = 0  # over all choices so far
    metrics: RequestMetrics | None = None


class _StopStrings:
    """Finds the first stop string in a choice's growing text; ``hold`` characters at the end may still turn into
    one, so they are not released before the choice finishes."""

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def find(self, text: str, start: int) -> int:
        """Index of the earliest stop string in ``text`` that ends after ``start``; -1 if none."""
        found = -1
        for s in self.stop:
            index = text.find(s, max(0, start - len(s) + 1))
            if index != -1 and (found == -1 or index < found):
                found = index
        return found


class _Choice:
    """One sequence's progress as seen by the caller: tokens and text released so far."""

    def __init__(self, index: int, seq: Sequence, tokenizer: Any, stop: _StopStrings | None,
                 eos_token_ids: frozenset[int]):
        self.index = index
        self.seq = seq
        self.detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self.stop = stop
        self.eos_token_ids = eos_token_ids
        self.text = ""  # decoded so far (cut at a stop string once found)
        self.released = 0  # characters of ``text`` handed out
        self.num_tokens = 0  # completion tokens handed out
        self.finish_reason: str | None = None

    def advance(self, count: int, engine_reason: FinishReason | None) -> tuple[ChoiceDelta | None, bool]:
        """The delta after the choice reached ``count`` completion tokens, and whether a stop string ended it.

        With stop strings the new tokens are decoded one at a time, so the choice ends at the token that completed
        the first stop string however many tokens arrived at once (its token ids, logprobs and usage stop there,
        as they would had the stop been seen at that step). As in vLLM, a stop string that ends within the text of
        the first ``min_tokens`` tokens does not count, and the eos or stop token that ended the choice is counted
        and has logprobs but adds no text."""
        if self.finish_reason is not None:
            return None, False
        seq = self.seq
        completion = seq.token_ids[seq.num_prompt_tokens : seq.num_prompt_tokens + count]
        text_ids = answer_token_ids(completion, engine_reason, seq.sampling_params, self.eos_token_ids)
        min_tokens = seq.sampling_params.min_tokens
        stopped = False
        if self.stop is None:
            self.text += self.detokenizer.step(text_ids)
        else:
            for end in range(self.num_tokens + 1, len(text_ids) + 1):
                stopped = self._extend(self.detokenizer.step(text_ids[:end]), search=end > min_tokens)
                if stopped:
                    completion = completion[:end]
                    break
        if engine_reason is not None and not stopped:
            stopped = self._extend(self.detokenizer.flush(text_ids), search=len(text_ids) > min_tokens)
        if stopped:
            self.finish_reason = "stop"
        elif engine_reason is not None:
            self.finish_reason = engine_reason.value
        hold = 0 if self.finish_reason is not None or self.stop is None else self.stop.hold
        upto = max(self.released, len(self.text) - hold)
        new_ids = completion[self.num_tokens :]
        if upto == self.released and not new_ids and self.finish_reason is None:
            return None, False
        logprobs = None
        if seq.logprobs is not None:
            k = seq.sampling_params.logprobs
            logprobs = [TokenLogprob(token_id, seq.logprobs[position][0], list(seq.logprobs[position][1].items())[:k])
                        for position, token_id in enumerate(new_ids, start=self.num_tokens)]
        delta = ChoiceDelta(self.index, self.text[self.released : upto], new_ids, logprobs, self.finish_reason)
        self.released, self.num_tokens = upto, len(completion)
        return delta, stopped

    def _extend(self, piece: str, search: bool = True) -> bool:
        """Append decoded text; with stop strings (and ``search``), cut it before the first one that ends in
        ``piece`` and say so."""
        searched_from = len(self.text)
        self.text += piece
        if self.stop is None or not piece or not search:
            return False
        index = self.stop.find(self.text, searched_from)
        if index == -1:
            return False
        self.text = self.text[:index]
        return True


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (character -> byte): printable Latin-1 bytes stand for
    themselves, the others for code points from 256 on, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)}
    alphabet, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(256 + shifted)] = byte
            shifted += 1
    return alphabet


_BYTE_LEVEL_ALPHABET = _byte_level_alphabet()
_BYTE_FALLBACK_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _raw_token_bytes(tokenizer: Any, token_id: int, token_text: Callable[[int], str]) -> bytes:
    """The bytes a token stands for: a byte-fallback token (``<0xE9>``), a byte-level BPE token, a SentencePiece
    piece (``\u2581`` is a space); anything else by its decoded text."""
    token = tokenizer.convert_ids_to_tokens(token_id) if tokenizer is not None else None
    if isinstance(token, str) and token:
        if match := _BYTE_FALLBACK_TOKEN.fullmatch(token):
            return bytes([int(match[1], 16)])
        if all(char in _BYTE_LEVEL_ALPHABET for char in token):
            return bytes(_BYTE_LEVEL_ALPHABET[char] for char in token)
        if "\u2581" in token:
            return token.replace("\u2581", " ").encode("utf-8")
    return token_text(token_id).encode("utf-8")


class _Wakeups:
    """Wakes the asyncio tasks of requests with news, from the engine's thread: one ``call_soon_threadsafe`` per
    batch of news, not one per request."""

    def __init__(self, event_loop: asyncio.AbstractEventLoop):
        self.event_loop = event_loop
        self.pending: deque[asyncio.Event] = deque()
        self.scheduled = False

    def notify(self, event: asyncio.Event) -> None:
        self.pending.append(event)
        if not self.scheduled:
            self.scheduled = True
            try:
                self.event_loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the event loop is closed: nobody is left to wake
                self.scheduled = False

    def _wake(self) -> None:
        self.scheduled = False
        while self.pending:
            self.pending.popleft().set()


class AsyncLLM:
    """``AsyncLLM(LLM(...))`` or ``AsyncLLM.from_model(path_or_model, **config)``; ``generate`` is an async iterator.

    Any number of asyncio tasks (and threads, and ``LLM.generate`` callers on the same ``LLM``) may generate at
    once; all their requests share one continuous batch.
    """

    def __init__(self, llm: LLM):
        self.llm = llm
        self.metrics = ServingMetrics()
        self._wakeups: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Wakeups] = weakref.WeakKeyDictionary()
        self._wakeups_lock = threading.Lock()
        self._token_texts: dict[int, str] = {}
        self._token_bytes: dict[int, bytes] = {}

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any = None, **config: Any) -> AsyncLLM:
        return cls(LLM(model, tokenizer=tokenizer, **config))

    @property
    def tokenizer(self) -> Any:
        return self.llm.tokenizer

    @property
    def max_model_len(self) -> int:
        """The context a request may use: ``max_model_len``, or less when the whole KV cache holds fewer tokens."""
        return self.llm.engine.max_sequence_tokens

    def token_text(self, token_id: int) -> str:
        """A single token's text (for logprobs), cached."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""
            self._token_texts[token_id] = text
        return text

    def token_bytes(self, token_id: int) -> bytes:
        """A single token's raw bytes (for chat logprobs): a character split over several tokens is not replaced
        by U+FFFD as in its decoded text. Cached."""
        raw = self._token_bytes.get(token_id)
        if raw is None:
            raw = self._token_bytes[token_id] = _raw_token_bytes(self.tokenizer, token_id, self.token_text)
        return raw

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt given as text (the tokenizer's special tokens added) or as token ids."""
        return self.llm._encode(prompt, 0)

    def _wakeups_for(self, event_loop: asyncio.AbstractEventLoop) -> _Wakeups:
        with self._wakeups_lock:
            wakeups = self._wakeups.get(event_loop)
            if wakeups is None:
                wakeups = self._wakeups[event_loop] = _Wakeups(event_loop)
            return wakeups

    async def prepare(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams | None = None,
        *,
        n: int = 1,
        stop: list[str] | None = None,
        request_id: str | None = None,
    ) -> RequestStream:
        """Validate a request and make its ``n`` sequences; nothing is queued until ``RequestStream.start``.

        Invalid input raises ValueError. Choice ``i`` of a seeded request uses seed ``seed + i`` (the choices
        differ, and each is reproducible).
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        params = sampling_params if sampling_params is not None else SamplingParams()
        token_ids = self.encode(prompt)
        choice_params = [params if params.seed is None or n == 1 else replace(params, seed=_choice_seed(params.seed, i))
                         for i in range(n)]
        if self.llm.sync_would_block():  # a rebuild, a refresh of the ranks or another sync: off the event loop
            seqs = await asyncio.to_thread(self.llm.sequences, [token_ids] * n, choice_params)
        else:  # a fraction of a millisecond, with no thread hop (which could wait on the engine thread for the GIL)
            seqs = self.llm.sequences([token_ids] * n, choice_params)
        stop_strings = _StopStrings(stop) if stop and any(stop) else None
        return RequestStream(self, request_id or uuid.uuid4().hex, seqs, stop_strings)

    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams | None = None,
                       **options: Any) -> AsyncIterator[RequestOutput]:
        """Stream one request's events (``prepare`` with the same arguments, ``start``, iterate). Leaving the
        iteration early (the client went away) aborts the request's unfinished choices and frees their KV blocks."""
        stream = await self.prepare(prompt, sampling_params, **options)
        stream.start()
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    def _finish_metrics(self, seqs: list[Sequence], choices: dict[int, _Choice]) -> RequestMetrics:
        now = time.monotonic()
        arrival = min(seq.arrival_time for seq in seqs)
        scheduled = [seq.first_scheduled_time for seq in seqs if seq.first_scheduled_time is not None]
        times = [seq.token_times or [] for seq in seqs]
        first_tokens = [t[0] for t in times if t]
        gaps = [later - earlier for t in times for earlier, later in zip(t, t[1:])]
        metrics = RequestMetrics(
            queue_time=(min(scheduled) - arrival) if scheduled else None,
            time_to_first_token=(min(first_tokens) - arrival) if first_tokens else None,
            inter_token_latencies=gaps,
            e2e_latency=now - arrival,
            num_prompt_tokens=seqs[0].num_prompt_tokens,
            num_generation_tokens=sum(choice.num_tokens for choice in choices.values()),
            finish_reasons=[choice.finish_reason for choice in choices.values()],
        )
        self.metrics.request_finished(metrics)
        return metrics

    def engine_gauges(self) -> dict[str, float]:
        """Running and waiting requests and KV cache usage right now (read without stopping the engine)."""
        engine = self.llm.engine
        scheduler = engine.scheduler
        blocks = scheduler.block_manager
        total = max(blocks.num_blocks, 1)
        return {
            "num_requests_running": len(scheduler.running),
            "num_requests_waiting": len(scheduler.waiting),
            "kv_cache_usage_perc": 1.0 - blocks.num_free_blocks / total,
            "num_preemptions": engine.stats.preemptions,
            "prefix_cache_hit_tokens": engine.stats.prefix_cache_hit_tokens,
        }

    def close(self) -> None:
        self.llm.close()


def _choice_seed(seed: int, index: int) -> int:
    """Seed of choice ``index``: ``seed + index``, wrapped into the range a generator accepts."""
    choice_seed = seed + index
    return choice_seed - 2**64 if choice_seed > SEED_RANGE[1] else choice_seed


class RequestStream:
    """One request's ``n`` choices on the engine: ``start`` queues them, iterating yields ``RequestOutput`` events
    until every choice finished, ``abort`` ends the unfinished ones (safe to call at any time, more than once)."""

    def __init__(self, owner: AsyncLLM, request_id: str, seqs: list[Sequence], stop: _StopStrings | None):
        self.owner = owner
        self.request_id = request_id
        self.seqs = seqs
        self.num_prompt_tokens = seqs[0].num_prompt_tokens
        eos_token_ids = frozenset(owner.llm.engine.eos_token_ids)
        self.choices = {seq.seq_id: _Choice(i, seq, owner.tokenizer, stop, eos_token_ids) for i, seq in enumerate(seqs)}
        self.group: RequestGroup | None = None
        self._event = asyncio.Event()
        self._unfinished = len(seqs)

    def start(self) -> None:
        """Queue the request; call from the event loop that will iterate it."""
        wakeups, event = self.owner._wakeups_for(asyncio.get_running_loop()), self._event
        self.group = self.owner.llm.loop.submit(self.seqs, watch_steps=True, on_news=lambda: wakeups.notify(event),
                                                background=True)
        self.owner.metrics.request_started()

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def abort(self) -> None:
        if self.group is not None and self._unfinished:
            self._unfinished = 0
            self.owner.llm.loop.abort(self.group)
            self.owner.metrics.request_aborted()

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        if self.group is None:
            raise RuntimeError("RequestStream.start() was not called")
        while self._unfinished:
            await self._event.wait()
            self._event.clear()
            deltas, stopped = self._drain()
            if stopped:
                self.owner.llm.loop.abort(self.group, stopped)
            was_aborted = not self._unfinished
            self._unfinished = sum(1 for choice in self.choices.values() if choice.finish_reason is None)
            if deltas or not self._unfinished:
                output = RequestOutput(self.request_id, self.num_prompt_tokens, deltas, finished=not self._unfinished,
                                       num_completion_tokens=sum(c.num_tokens for c in self.choices.values()))
                if not self._unfinished and not was_aborted:
                    output.metrics = self.owner._finish_metrics(self.seqs, self.choices)
                yield output

    def _drain(self) -> tuple[list[ChoiceDelta], list[Sequence]]:
        """Apply every update the engine queued: the resulting deltas (one per changed choice, in choice order) and
        the sequences a stop string just ended. A request that failed raises its error here."""
        choices, latest = self.choices, {}
        queue = self.group.updates
        while not queue.empty():
            update = queue.get_nowait()
            if update is None:
                for seq_id, choice in choices.items():  # the group is done: each sequence's final state
                    if choice.finish_reason is None:
                        seq = choice.seq
                        latest[seq_id] = (seq.num_completion_tokens, seq.finish_reason or FinishReason.ABORT)
                break
            for seq, count, reason in update:
                latest[seq.seq_id] = (count, reason)
        deltas, stopped = [], []
        for seq_id, (count, reason) in sorted(latest.items(), key=lambda item: choices[item[0]].index):
            choice = choices[seq_id]
            if reason is FinishReason.ABORT and choice.seq.error is not None and choice.finish_reason is None:
                self.abort()  # the request failed: its other choices end too
                raise choice.seq.error
            delta, hit_stop = choice.advance(count, reason)
            if delta is not None:
                deltas.append(delta)
            if hit_stop:
                stopped.append(choice.seq)
        return deltas, stopped
