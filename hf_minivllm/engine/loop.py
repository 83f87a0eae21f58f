"""One engine, any number of callers: each call's requests join the running batch, each caller gets its own.

Callers hand the engine commands (new requests, aborts, functions to run between steps) through one queue. Whoever
is waiting for something drives the engine: the first waiting caller takes the driver's seat, runs commands and
steps (everyone's requests, one continuous batch) until what it waits for is there, then hands the seat to another
waiting caller if work remains. A single caller therefore runs every step on its own thread, exactly as a plain
loop would; many callers share one batch with no thread of the engine's own. A background thread drives only when
work is left that no caller waits for (an abort after a caller left). Whatever ends a request early (its caller
left, its step hook raised, a step failed) reaches exactly the callers whose requests it ended, as their
exception. An on-demand KV cache is shrunk before the callers of the last requests are woken, so a caller that
goes on to train finds the memory free.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from queue import SimpleQueue
from typing import Any, NamedTuple

import torch

from hf_minivllm.engine.llm_engine import EngineClosed, LLMEngine, StepResult
from hf_minivllm.engine.sequence import FinishReason, Sequence

logger = logging.getLogger(__name__)

CLOSED_MESSAGE = ("this engine is closed (LLM.close, hf_minivllm.restore, or a decoder it could not rebuild); "
                  "make a new one")

# How long a waiting caller sleeps before it checks again whether it should drive (a lost hand-off costs no more).
_RECHECK_S = 0.5

# Loops still alive at interpreter exit are closed first, so no thread is inside a step during teardown.
_live_loops: weakref.WeakSet[EngineLoop] = weakref.WeakSet()


@atexit.register
def _close_live_loops() -> None:
    for loop in list(_live_loops):
        try:
            loop.close()
        except Exception:  # noqa: BLE001 - exiting anyway; the other loops must still be closed
            logger.exception("could not close an engine at exit")


class SeqUpdate(NamedTuple):
    """A request's state right after a step: how many tokens it has generated and whether it finished. Reading
    ``seq.token_ids`` (or ``seq.logprobs``) up to that count is safe from any thread while the engine goes on."""

    seq: Sequence
    num_completion_tokens: int
    finish_reason: FinishReason | None


class RequestGroup:
    """The requests of one call. ``done`` is set once every one of them finished; with ``watch_steps`` the loop
    puts, after every step that changed any of them, a list of ``SeqUpdate`` (those that got a token or finished),
    and None once the group is done."""

    def __init__(self, seqs: list[Sequence], watch_steps: bool, on_news: Callable[[], None] | None = None,
                 background: bool = False):
        self.seqs = seqs
        self.num_unfinished = len(seqs)
        self.done = threading.Event()
        self.updates: SimpleQueue | None = SimpleQueue() if watch_steps else None
        self.wake: threading.Event | None = None  # set with every piece of news, to wake the caller waiting on it
        self.on_news = on_news  # called (on the driving thread) with every piece of news, e.g. to wake an event loop
        self.background = background  # its caller cannot drive (an asyncio task): a background thread does

    def notify(self) -> None:
        if self.wake is not None:
            self.wake.set()
        if self.on_news is not None:
            try:
                self.on_news()
            except Exception:  # noqa: BLE001 - the caller's hook: raising here would leave other groups unwoken
                logger.exception("a request group's on_news callback failed")

    @property
    def num_finished(self) -> int:
        return len(self.seqs) - self.num_unfinished

    def error(self) -> BaseException | None:
        """Why the call failed: the first request that ended with an error (or was aborted), else None."""
        for seq in self.seqs:
            if seq.error is not None:
                return seq.error
        if any(seq.finish_reason is FinishReason.ABORT for seq in self.seqs):
            return EngineClosed("the request was aborted before it finished")
        return None


class _Call:
    """A function the loop runs between steps for a caller that waits for its result."""

    def __init__(self, function: Callable[[LLMEngine], Any]):
        self.function = function
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.wake: threading.Event | None = None

    def notify(self) -> None:
        if self.wake is not None:
            self.wake.set()


class _Mailbox:
    """What callers share, guarded by ``lock``: the command queue, who drives now, the waiting callers' wake-up
    events, and the closed flag."""

    def __init__(self):
        # Reentrant, for its ``_is_owned``: a stream garbage-collected while its thread holds the lock must not
        # wait for it (``EngineLoop._abandon``).
        self.lock = threading.RLock()
        self.commands: deque[tuple[str, Any]] = deque()
        self.driver: threading.Thread | None = None
        self.waiters: dict[threading.Event, None] = {}  # insertion-ordered set
        self.closed = False
        self.close_call: _Call | None = None
        self.background_groups = 0  # unfinished groups whose callers cannot drive


def _device_and_stream(device: torch.device) -> contextlib.AbstractContextManager:
    """The engine's device and that device's default stream (every step on one stream, whoever drives)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.cuda.device(device))
    stack.enter_context(torch.cuda.stream(torch.cuda.default_stream(device)))
    return stack


class _DeferredInterrupt:
    """On the main thread, holds Ctrl-C while a step runs and raises it between steps (``raise_if_pending``): an
    interrupt in the middle of a step would leave the scheduler and block tables half-updated."""

    def __enter__(self) -> _DeferredInterrupt:
        self.pending = self.raised = False
        self.previous = None
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.previous = signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum: int, frame: Any) -> None:
        self.pending = True

    def raise_if_pending(self) -> None:
        if self.pending:
            self.pending, self.raised = False, True
            raise KeyboardInterrupt

    def __exit__(self, *exc_info: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        if self.pending and exc_info[0] is None:
            raise KeyboardInterrupt


def _drive_in_background(loop_ref: weakref.ref) -> None:
    """A thread that drives until the engine is idle, for work no caller waits for; holds the loop only meanwhile."""
    loop = loop_ref()
    if loop is not None:
        loop._try_drive(lambda: False)


class EngineLoop:
    """Steps one ``LLMEngine`` on behalf of any number of calling threads (see the module docstring).

    ``state_lock`` is held while a step changes request state; a caller reading its running requests' tokens
    (streaming) takes it for the read.
    """

    def __init__(self, engine: LLMEngine, name: str = "hf-minivllm-engine"):
        self.engine = engine
        self.name = name
        self.state_lock = threading.RLock()
        self._mailbox = _Mailbox()
        self._group_of: dict[int, RequestGroup] = {}  # seq_id -> its group (driver only)
        self._num_watchers = 0  # groups with watch_steps among those running
        _live_loops.add(self)

    # ---- what callers call ---------------------------------------------------------------------------------

    def submit(self, seqs: list[Sequence], watch_steps: bool = False, on_news: Callable[[], None] | None = None,
               background: bool = False) -> RequestGroup:
        """Queue the sequences (made by ``LLMEngine.new_sequences``) as one group; ``wait`` or ``updates`` run it.

        ``background=True`` is for callers that cannot block (an asyncio front): a background thread drives while
        such groups are unfinished and no caller waits. Watched groups record when each token arrived
        (``Sequence.token_times``)."""
        group = RequestGroup(seqs, watch_steps, on_news, background)
        if watch_steps:
            for seq in seqs:
                seq.token_times = []
        if not seqs:
            group.done.set()
            if group.updates is not None:
                group.updates.put(None)
            group.notify()
            return group
        self._post("submit", group)
        if background:
            self._hand_off(start_background=True)
        return group

    def wait(self, group: RequestGroup, poll: Callable[[RequestGroup], None] | None = None,
             poll_interval_s: float = _RECHECK_S) -> list[Sequence]:
        """Run the engine (or let whoever drives run it) until the group finished; its sequences, or its error
        raised. Interrupted (KeyboardInterrupt or any exception), the group's unfinished requests are aborted before
        the exception goes on."""
        try:
            self._wait_until(group.done.is_set, group, poll and (lambda: poll(group)), poll_interval_s)
        except BaseException:  # Ctrl-C (between steps, if this thread drove) or the caller's own poll failing
            self.abort(group)
            raise
        if poll is not None:
            poll(group)
        error = group.error()
        if error is not None:
            raise error
        return group.seqs

    def updates(self, group: RequestGroup) -> Iterator[list[SeqUpdate]]:
        """The group's per-step updates (sequences that got a token or finished) as the engine makes them.

        The engine runs while the consumer asks for the next update (or while other callers wait), not while the
        consumer works. Leaving the iteration early (or an exception in the consumer) aborts the group's unfinished
        requests and returns once they are gone (their blocks freed).
        """
        if group.updates is None:
            raise ValueError("this group was submitted without watch_steps")
        queue = group.updates
        try:
            while True:
                self._wait_until(lambda: not queue.empty(), group)
                update = queue.get_nowait()
                if update is None:
                    break
                yield update
        finally:
            if not group.done.is_set():
                self._abandon(group)
        error = group.error()
        if error is not None:
            raise error

    def _abandon(self, group: RequestGroup) -> None:
        """Abort a stream left early and wait until its blocks are free, unless this thread cannot wait: one
        inside the loop's own bookkeeping (the collector ran while it held the mailbox's lock: another thread
        posts the abort once the lock is free), the driver itself (a stream garbage-collected inside a step) or a
        reader inside ``state_lock``."""
        mailbox = self._mailbox
        if mailbox.lock._is_owned():
            threading.Thread(target=self.abort, args=(group,), name=self.name, daemon=True).start()
            return
        if mailbox.driver is threading.current_thread():
            with mailbox.lock:
                mailbox.commands.append(("abort", (group, None)))
            return
        self.abort(group)
        if not self.state_lock._is_owned():
            self._wait_until(group.done.is_set, group)

    def abort(self, group: RequestGroup, seqs: list[Sequence] | None = None) -> None:
        """End the group's unfinished requests (all, or ``seqs`` of them: a stop string found in their text);
        returns at once, the abort is done in the background if no caller drives."""
        if not group.done.is_set():
            self._post("abort", (group, seqs), allow_closed=True)
            self._hand_off(start_background=True)

    def post(self, function: Callable[[LLMEngine], Any]) -> None:
        """Run ``function(engine)`` before any request queued after this call (by the next driver); no waiting."""
        self._post("call", _Call(function))

    def call(self, function: Callable[[LLMEngine], Any]) -> Any:
        """Run ``function(engine)`` between steps and return its result (or raise its exception)."""
        call = _Call(function)
        self._post("call", call)
        self._wait_until(call.done.is_set, call)
        if call.error is not None:
            raise call.error
        return call.result

    def close(self) -> None:
        """Abort every request (their callers get ``EngineClosed``), release the engine's memory and refuse new work.

        Concurrent closes wait for the same one."""
        mailbox = self._mailbox
        with mailbox.lock:
            if mailbox.driver is threading.current_thread():
                raise RuntimeError("the engine cannot be closed from inside its own step")
            if mailbox.close_call is None:
                mailbox.close_call = _Call(lambda engine: self._close())
                mailbox.commands.append(("call", mailbox.close_call))
                mailbox.closed = True
            call = mailbox.close_call
        self._wait_until(call.done.is_set, call)
        if call.error is not None:
            raise call.error

    @property
    def closed(self) -> bool:
        return self._mailbox.closed

    def ensure_not_driving(self) -> None:
        """Raise if this thread is inside one of the engine's steps (generate called from a step hook)."""
        if self._mailbox.driver is threading.current_thread():
            raise RuntimeError("the engine was called from inside its own step (e.g. generate inside a logits "
                               "processor or stopping criterion); that would wait on itself forever")

    # ---- driving -------------------------------------------------------------------------------------------

    def _post(self, kind: str, payload: Any, allow_closed: bool = False) -> None:
        self.ensure_not_driving()
        mailbox = self._mailbox
        with mailbox.lock:
            if mailbox.closed:
                if allow_closed:
                    return
                raise EngineClosed(CLOSED_MESSAGE)
            mailbox.commands.append((kind, payload))
            if kind == "submit" and payload.background:
                mailbox.background_groups += 1

    def _wait_until(self, ready: Callable[[], bool], waited_on: RequestGroup | _Call | None = None,
                    poll: Callable[[], None] | None = None, poll_interval_s: float = _RECHECK_S) -> None:
        """Make progress until ``ready()``: drive when nobody does, else sleep until woken (news of what is waited
        on, or the driver's seat handed over) or until ``poll_interval_s`` passed."""
        mailbox, wake = self._mailbox, threading.Event()
        if waited_on is not None:
            waited_on.wake = wake
        with mailbox.lock:
            mailbox.waiters[wake] = None
        try:
            while not ready():
                if self._try_drive(ready, poll, poll_interval_s):
                    continue
                wake.wait(timeout=poll_interval_s)
                wake.clear()
                if poll is not None:
                    poll()
        finally:
            with mailbox.lock:
                mailbox.waiters.pop(wake, None)
            self._hand_off()

    def _try_drive(self, ready: Callable[[], bool], poll: Callable[[], None] | None = None,
                   poll_interval_s: float = _RECHECK_S) -> bool:
        """Take the driver's seat if it is free and run the engine until ``ready()`` or idle; whether it drove."""
        mailbox, seated = self._mailbox, False
        try:
            with mailbox.lock:
                if mailbox.driver is not None:
                    return False
                mailbox.driver, seated = threading.current_thread(), True
            self._drive(ready, poll, poll_interval_s)
        finally:
            if seated:
                with mailbox.lock:
                    mailbox.driver = None
                self._hand_off()
        return True

    def _hand_off(self, start_background: bool = False) -> None:
        """With work left and the seat free: wake a waiting caller to drive; with nobody waiting, a background
        thread finishes aborts (and anything else, if asked)."""
        mailbox = self._mailbox
        with mailbox.lock:
            if mailbox.driver is not None or not (mailbox.commands or self.engine.has_unfinished()):
                return
            if mailbox.waiters:
                next(iter(mailbox.waiters)).set()
                return
            start_background = (start_background or mailbox.background_groups > 0
                                 or any(kind == "abort" for kind, _ in mailbox.commands))
        if start_background:
            threading.Thread(target=_drive_in_background, args=(weakref.ref(self),), name=self.name,
                             daemon=True).start()

    def _drive(self, ready: Callable[[], bool], poll: Callable[[], None] | None, poll_interval_s: float) -> None:
        """Run commands and steps until ``ready()`` or nothing is left to do, on the engine's device and default
        stream (the caller's own device and stream are restored afterwards). Ctrl-C on the main thread waits for
        the step in progress and is raised between steps, where the engine's state is whole."""
        device = self.engine.runner.device
        last_poll = time.monotonic()
        polling = False  # the caller's own poll runs: its failure is that caller's, not the engine's
        with _device_and_stream(device), _DeferredInterrupt() as interrupt:
            try:
                while not ready():
                    self._run_commands()
                    interrupt.raise_if_pending()
                    if self.engine.runner.device != device:
                        return  # a rebuild moved the engine: drive again on the new device
                    if self.engine.has_unfinished():
                        self._step()
                        interrupt.raise_if_pending()
                    elif not self._mailbox.commands:
                        self._release_memory()
                        return
                    if poll is not None and time.monotonic() - last_poll >= poll_interval_s:
                        polling = True
                        poll()
                        polling = False
                        last_poll = time.monotonic()
            except BaseException as error:
                if interrupt.raised or polling:
                    raise  # between steps: the engine is whole; the waiting call aborts its own requests
                if not isinstance(error, KeyboardInterrupt):
                    logger.exception("the engine loop failed")
                failure = RuntimeError(f"the engine stopped in the middle of a step ({error!r}); "
                                       "this request was aborted")
                failure.__cause__ = error
                self._fail_everything(failure)
                raise

    def _take_command(self) -> tuple[str, Any] | None:
        with self._mailbox.lock:
            return self._mailbox.commands.popleft() if self._mailbox.commands else None

    def _run_commands(self) -> None:
        while (command := self._take_command()) is not None:
            kind, payload = command
            if kind == "submit":
                self._admit(payload)
            elif kind == "abort":
                self._abort(*payload)
            elif kind == "call":
                self._run_call(payload)

    def _admit(self, group: RequestGroup) -> None:
        if self.engine.closed:
            for seq in group.seqs:
                seq.error = EngineClosed(CLOSED_MESSAGE)
            group.num_unfinished = 0
            self._finish_group(group)
            return
        for seq in group.seqs:
            self._group_of[seq.seq_id] = group
        if group.updates is not None:
            self._num_watchers += 1
        with self.state_lock:
            self.engine.add_sequences(group.seqs)

    def _abort(self, group: RequestGroup, seqs: list[Sequence] | None) -> None:
        unfinished = [seq for seq in (group.seqs if seqs is None else seqs) if seq.seq_id in self._group_of]
        with self.state_lock:
            self.engine.abort(unfinished)
        self._report(StepResult([], unfinished, False, 0))

    def _run_call(self, call: _Call) -> None:
        try:
            with self.state_lock:
                call.result = call.function(self.engine)
        except Exception as error:  # noqa: BLE001 - handed to the caller waiting on it
            call.error = error
        except BaseException as error:  # an interrupt while running it: the caller hears, the driver raises it
            call.error = RuntimeError(f"interrupted while running {call.function!r}")
            call.error.__cause__ = error
            raise
        finally:
            call.done.set()
            call.notify()
            for result in self.engine.take_unreported():
                self._report(result)

    def _close(self) -> None:
        """Runs as a call (``state_lock`` held): abort everything, then release the engine's memory."""
        aborted = self.engine.abort_all(EngineClosed("the engine was closed while this request ran"))
        try:
            self.engine.close()
        finally:  # releasing may fail (a dead tensor-parallel worker): the aborted callers must hear regardless
            self._report(StepResult([], aborted, False, 0))

    def _step(self) -> None:
        try:
            with self.state_lock:
                result = self.engine.step()
        except Exception as error:  # noqa: BLE001 - a failed step fails the requests it held, the engine goes on
            logger.warning("an engine step failed; its requests end with the error: %r", error)
            with self.state_lock:
                aborted = self.engine.abort_all(error)
            result = StepResult([], aborted, False, 0)
        self._report(result)

    def _report(self, result: StepResult) -> None:
        """Hand the step's news to the waiting callers; when the engine went idle, release memory first."""
        if self._num_watchers:
            now = time.monotonic()
            for seq in result.updated:
                if seq.token_times is not None:
                    seq.token_times.append(now)
            changed: dict[int, tuple[RequestGroup, dict[int, SeqUpdate]]] = {}
            for seq in [*result.updated, *result.finished]:
                group = self._group_of.get(seq.seq_id)
                if group is not None and group.updates is not None:
                    members = changed.setdefault(id(group), (group, {}))[1]
                    members[seq.seq_id] = SeqUpdate(seq, seq.num_completion_tokens, seq.finish_reason)
            for group, members in changed.values():
                group.updates.put(list(members.values()))
                group.notify()
        done = []
        for seq in result.finished:
            group = self._group_of.pop(seq.seq_id, None)
            if group is None:
                continue
            group.num_unfinished -= 1
            if group.num_unfinished == 0:
                done.append(group)
                if group.updates is not None:
                    self._num_watchers -= 1
        if done and not self.engine.has_unfinished() and not self._mailbox.commands:
            self._release_memory()  # before the callers wake: the memory is free when they go on
        for group in done:
            self._finish_group(group)

    def _finish_group(self, group: RequestGroup) -> None:
        if group.background:
            with self._mailbox.lock:
                self._mailbox.background_groups -= 1
        group.done.set()
        if group.updates is not None:
            group.updates.put(None)
        group.notify()

    def _release_memory(self) -> None:
        if self.engine.runner is None or self.engine.has_unfinished():
            return
        try:
            with self.state_lock:
                self.engine.release_idle_memory()
        except Exception:  # noqa: BLE001 - keeping the memory is not an error worth failing callers for
            logger.exception("could not shrink the KV cache")

    def _fail_everything(self, error: BaseException) -> None:
        """End every request and wake every caller with ``error``: running groups, queued submissions and calls."""
        try:
            with self.state_lock:
                self.engine.abort_all(error)
        except Exception:  # noqa: BLE001 - the engine may be what failed; the callers must hear of it regardless
            logger.exception("could not abort the engine's requests")
        groups = {id(group): group for group in self._group_of.values()}
        self._group_of.clear()
        self._num_watchers = 0
        while (command := self._take_command()) is not None:
            kind, payload = command
            if kind == "submit":
                groups[id(payload)] = payload
            elif kind == "call":
                payload.error = error
                payload.done.set()
                payload.notify()
        for group in groups.values():
            for seq in group.seqs:
                if not seq.is_finished and seq.error is None:
                    seq.error = error
            self._finish_group(group)
