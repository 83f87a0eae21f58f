"""One engine loop, any number of callers: each call's requests join the running batch, each caller waits on its own.

The loop runs on a thread of its own, started when work arrives and ended when the engine is idle; it alone touches
the engine. Callers hand it commands (new requests, aborts, functions to run between steps) through a queue and
wait on a ``RequestGroup``: its ``done`` event, and for callers that stream, a queue of per-step updates. Whatever
ends a request early (its caller left, its step hook raised, a step failed) reaches exactly the callers whose
requests it ended, as their exception. An on-demand KV cache is shrunk before the callers of the last requests are
woken, so a caller that goes on to train finds the memory free.
"""
from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from queue import Empty, SimpleQueue
from typing import Any

import torch

from hf_minivllm.engine.llm_engine import LLMEngine, StepResult
from hf_minivllm.engine.sequence import FinishReason, Sequence

logger = logging.getLogger(__name__)

# How often a waiting caller checks that the loop thread is still alive (seconds).
_LIVENESS_INTERVAL_S = 1.0
# How long an idle loop thread waits for more work before it ends: calls in a row reuse one thread.
_IDLE_THREAD_S = 2.0


# Loops still alive at interpreter exit are closed first, so no loop thread is inside a step during teardown.
_live_loops: weakref.WeakSet[EngineLoop] = weakref.WeakSet()


@atexit.register
def _close_live_loops() -> None:
    for loop in list(_live_loops):
        loop.close()


class EngineClosed(RuntimeError):
    """The engine was closed (``LLM.close``, ``hf_minivllm.restore``) before or while a request ran."""


class RequestGroup:
    """The requests of one call. ``done`` is set once every one of them finished; with ``watch_steps`` the loop
    puts, after every step that changed any of them, the list of those that got a token or finished, and None
    once the group is done."""

    def __init__(self, seqs: list[Sequence], watch_steps: bool):
        self.seqs = seqs
        self.num_unfinished = len(seqs)
        self.done = threading.Event()
        self.updates: SimpleQueue | None = SimpleQueue() if watch_steps else None

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


class _Mailbox:
    """What the loop thread shares with callers: the command queue, the thread itself, the closed flag (all
    guarded by ``lock``). The thread keeps this strongly and the loop only weakly while idle, so an engine its
    owner dropped is freed without waiting for the thread to end."""

    def __init__(self):
        self.lock = threading.Lock()
        self.work_arrived = threading.Condition(self.lock)
        self.commands: deque[tuple[str, Any]] = deque()
        self.thread: threading.Thread | None = None
        self.closed = False


def _thread_main(loop_ref: weakref.ref, mailbox: _Mailbox) -> None:
    """The loop thread: works until the engine is idle, then waits a while for more, holding the loop weakly."""
    while True:
        loop = loop_ref()
        if loop is None or not loop._work_until_idle():
            with mailbox.lock:
                mailbox.thread = None
            return
        del loop
        with mailbox.lock:
            if not mailbox.commands and not mailbox.closed:
                mailbox.work_arrived.wait(timeout=_IDLE_THREAD_S)
            if not mailbox.commands:
                mailbox.thread = None
                return


class EngineLoop:
    """Drives one ``LLMEngine`` from a background thread on behalf of any number of calling threads.

    ``state_lock`` is held while a step changes request state; a caller reading its running requests' tokens
    (streaming) takes it for the read.
    """

    def __init__(self, engine: LLMEngine, name: str = "hf-minivllm-engine"):
        self.engine = engine
        self.name = name
        self.state_lock = threading.Lock()
        self._mailbox = _Mailbox()
        self._group_of: dict[int, RequestGroup] = {}  # seq_id -> its group (loop thread only)
        self._num_watchers = 0  # groups with watch_steps among those running
        _live_loops.add(self)

    # ---- callers' side -------------------------------------------------------------------------------------

    def submit(self, seqs: list[Sequence], watch_steps: bool = False) -> RequestGroup:
        """Queue the sequences (made by ``LLMEngine.new_sequences``) as one group."""
        group = RequestGroup(seqs, watch_steps)
        if not seqs:
            group.done.set()
            return group
        self._post("submit", group)
        return group

    def wait(self, group: RequestGroup, poll: Callable[[RequestGroup], None] | None = None,
             poll_interval_s: float = _LIVENESS_INTERVAL_S) -> list[Sequence]:
        """Block until the group finished; its sequences, or its error raised. Interrupted (KeyboardInterrupt or
        any exception), the group's unfinished requests are aborted before the exception goes on."""
        try:
            while not group.done.wait(timeout=poll_interval_s):
                if poll is not None:
                    poll(group)
                self._check_alive(group)
        except BaseException:
            self.abort(group)
            raise
        if poll is not None:
            poll(group)
        error = group.error()
        if error is not None:
            raise error
        return group.seqs

    def updates(self, group: RequestGroup) -> Iterator[list[Sequence]]:
        """The group's per-step updates as they come (sequences that got a token or finished), until it is done.

        Leaving the iteration early (or an exception in the consumer) aborts the group's unfinished requests and
        returns once they are gone (their blocks freed).
        """
        if group.updates is None:
            raise ValueError("this group was submitted without watch_steps")
        try:
            while True:
                try:
                    update = group.updates.get(timeout=_LIVENESS_INTERVAL_S)
                except Empty:
                    self._check_alive(group)
                    continue
                if update is None:
                    break
                yield update
        finally:
            if not group.done.is_set():
                self.abort(group)
                while not group.done.wait(timeout=_LIVENESS_INTERVAL_S) and self._mailbox.thread is not None:
                    pass
        error = group.error()
        if error is not None:
            raise error

    def abort(self, group: RequestGroup) -> None:
        """End the group's unfinished requests (its caller left); returns at once."""
        if not group.done.is_set():
            self._post("abort", group, allow_closed=True)

    def post(self, function: Callable[[LLMEngine], Any]) -> None:
        """Run ``function(engine)`` on the loop before any request queued after this call; do not wait for it."""
        self._post("call", _Call(function))

    def call(self, function: Callable[[LLMEngine], Any]) -> Any:
        """Run ``function(engine)`` on the loop between steps and return its result (or raise its exception)."""
        call = _Call(function)
        self._post("call", call)
        while not call.done.wait(timeout=_LIVENESS_INTERVAL_S):
            if self._mailbox.thread is None and not call.done.is_set():
                raise RuntimeError(f"the engine loop {self.name} stopped before running {function!r}")
        if call.error is not None:
            raise call.error
        return call.result

    def close(self) -> None:
        """Abort every request (their callers get ``EngineClosed``), release the engine's memory and refuse new work."""
        mailbox = self._mailbox
        with mailbox.lock:
            if mailbox.closed:
                return
        self._post("close", None)
        with mailbox.lock:
            mailbox.closed = True
            thread = mailbox.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    @property
    def closed(self) -> bool:
        return self._mailbox.closed

    def _post(self, kind: str, payload: Any, allow_closed: bool = False) -> None:
        mailbox = self._mailbox
        if mailbox.thread is threading.current_thread():
            raise RuntimeError("the engine was called from inside its own step (e.g. generate inside a logits "
                               "processor or stopping criterion); that would wait on itself forever")
        with mailbox.lock:
            if mailbox.closed:
                if allow_closed:
                    return
                raise EngineClosed("this engine is closed (LLM.close or hf_minivllm.restore); make a new one")
            mailbox.commands.append((kind, payload))
            mailbox.work_arrived.notify()
            if mailbox.thread is None:
                mailbox.thread = threading.Thread(target=_thread_main, args=(weakref.ref(self), mailbox),
                                                  name=self.name, daemon=True)
                mailbox.thread.start()

    def _check_alive(self, group: RequestGroup) -> None:
        with self._mailbox.lock:
            stopped = self._mailbox.thread is None
        if stopped and not group.done.is_set():
            raise RuntimeError(f"the engine loop {self.name} stopped while this call's requests were unfinished")

    # ---- the loop thread ------------------------------------------------------------------------------------

    def _work_until_idle(self) -> bool:
        """Run commands and steps until nothing is left; False if the loop itself failed (callers were failed)."""
        try:
            self._set_device()
            while True:
                self._run_commands()
                if self.engine.has_unfinished():
                    self._step()
                    continue
                self._release_memory()
                return True
        except BaseException as error:  # noqa: BLE001 - a bug in the loop itself: fail every caller, never hang
            logger.exception("the engine loop failed")
            self._fail_everything(error)
            return False

    def _set_device(self) -> None:
        device = self.engine.runner.device
        if device.type == "cuda":
            torch.cuda.set_device(device)

    def _take_command(self) -> tuple[str, Any] | None:
        with self._mailbox.lock:
            return self._mailbox.commands.popleft() if self._mailbox.commands else None

    def _run_commands(self) -> None:
        while (command := self._take_command()) is not None:
            kind, payload = command
            if kind == "submit":
                self._admit(payload)
            elif kind == "abort":
                self._abort(payload, None)
            elif kind == "call":
                self._run_call(payload)
            elif kind == "close":
                self._close()

    def _admit(self, group: RequestGroup) -> None:
        for seq in group.seqs:
            self._group_of[seq.seq_id] = group
        if group.updates is not None:
            self._num_watchers += 1
        with self.state_lock:
            self.engine.add_sequences(group.seqs)

    def _abort(self, group: RequestGroup, error: BaseException | None) -> None:
        unfinished = [seq for seq in group.seqs if seq.seq_id in self._group_of]
        with self.state_lock:
            self.engine.abort(unfinished, error)
        self._report(StepResult([], unfinished, False, 0))

    def _run_call(self, call: _Call) -> None:
        try:
            with self.state_lock:
                call.result = call.function(self.engine)
        except BaseException as error:  # noqa: BLE001 - handed to the caller waiting on it
            call.error = error
        finally:
            self._set_device()
            call.done.set()

    def _close(self) -> None:
        error = EngineClosed("the engine was closed while this request ran")
        with self.state_lock:
            aborted = self.engine.abort_all(error)
            self.engine.close()
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
            changed: dict[int, list[Sequence]] = {}
            for seq in [*result.updated, *result.finished]:
                group = self._group_of.get(seq.seq_id)
                if group is not None and group.updates is not None:
                    members = changed.setdefault(id(group), [])
                    if not members or members[-1] is not seq:
                        members.append(seq)
            for members in changed.values():
                self._group_of[members[0].seq_id].updates.put(members)
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
            self._release_memory()
        for group in done:
            group.done.set()
            if group.updates is not None:
                group.updates.put(None)

    def _release_memory(self) -> None:
        if self.engine.runner is None or self.engine.has_unfinished():
            return
        try:
            with self.state_lock:
                self.engine.release_idle_memory()
        except Exception:  # noqa: BLE001 - keeping the memory is not an error worth failing callers for
            logger.exception("could not shrink the KV cache")

    def _fail_everything(self, error: BaseException) -> None:
        """Wake every caller with ``error``: running groups, queued submissions and queued calls."""
        groups = {id(group): group for group in self._group_of.values()}
        self._group_of.clear()
        while (command := self._take_command()) is not None:
            kind, payload = command
            if kind == "submit":
                groups[id(payload)] = payload
            elif kind == "call":
                payload.error = error
                payload.done.set()
        for group in groups.values():
            for seq in group.seqs:
                if not seq.is_finished and seq.error is None:
                    seq.error = error
            group.done.set()
            if group.updates is not None:
                group.updates.put(None)
