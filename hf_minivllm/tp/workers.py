"""Rank 0's side of tensor parallelism: starts ranks 1..N-1 as worker processes, owns them, and drives them.

Workers are fresh interpreters (running ``hf_minivllm.tp.worker.main``), not forks or ``multiprocessing`` spawns, so
the caller's script is never re-imported (no ``if __name__ == "__main__"`` needed) and CUDA is never forked. They
connect back over a Unix socket with a random key; commands and step plans (numpy arrays, see
``hf_minivllm.engine.step_plan``) travel over it, sized as they come, while weights and sampled tokens go over the
ranks' process group.

Lifetime: ``close()``, garbage collection and interpreter exit stop the workers (``weakref.finalize``); a worker
whose parent disappears exits by itself. A worker that fails reports its traceback, which rank 0 raises as
``TensorParallelError``; one that dies is noticed within a poll interval while rank 0 waits on the device, so the
caller gets an exception, never a hang.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any

import torch

from hf_minivllm.config import Config
from hf_minivllm.engine.step_plan import StepPlan
from hf_minivllm.layers.parallel import NCCL_ENVIRONMENT, ParallelGroup
from hf_minivllm.models.decoder import DecoderForCausalLM
from hf_minivllm.tp.weights import copy_weights, manifest, portable_config, send_weights
from hf_minivllm.tp.worker import ENV_ADDRESS, ENV_AUTHKEY, ENV_RANK, receive_message, send_message

# The workers import what this process can (a checkout added to sys.path included), its paths *after* their own: put
# first (PYTHONPATH), a script's folder holding e.g. an ``nt.py`` would shadow the standard library.
_ENV_SYS_PATH = "HF_MINIVLLM_TP_SYS_PATH"
_WORKER_ENTRY = (f"import os, sys; sys.path += [p for p in os.environ.pop({_ENV_SYS_PATH!r}).split(os.pathsep) "
                 "if p not in sys.path]; from hf_minivllm.tp.worker import main; main()")
# How long starting the workers or one command (loading weights, building a runner) may take.
DEFAULT_TIMEOUT_S = 600.0
# How often rank 0 checks on its workers while it waits for them or for the device.
_POLL_S = 0.005


class TensorParallelError(RuntimeError):
    """A tensor-parallel worker failed or died; the engine cannot go on (close it and make a new one)."""


def tensor_parallel_devices(first: torch.device, size: int, preferred: list[torch.device] | None = None) -> list[torch.device]:
    """One device per rank: rank 0 on ``first``, then the GPUs in ``preferred`` (where the model already lies), then
    the others in order. On CPU every rank is a process on the CPU. ValueError when there are too few GPUs."""
    if first.type != "cuda":
        return [first] * size
    count = torch.cuda.device_count()
    if size > count:
        raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs, but {count} are visible")
    first = torch.device("cuda", first.index if first.index is not None else torch.cuda.current_device())
    order = [device.index for device in preferred or [] if device.type == "cuda"] + list(range(count))
    indices = [first.index]
    for index in order:
        if index not in indices:
            indices.append(index)
    return [torch.device("cuda", index) for index in indices[:size]]


class TensorParallelWorkers:
    """Ranks 1..N-1 of one model, each in its own process, and rank 0's ``group`` with them.

    Not thread-safe: the engine's loop drives it (one caller at a time).
    """

    def __init__(self, devices: list[torch.device], timeout_s: float = DEFAULT_TIMEOUT_S):
        self.size = len(devices)
        self.devices = devices
        self.timeout_s = timeout_s
        self._failure: str | None = None
        self.group: ParallelGroup | None = None  # set once every rank has joined
        store = ParallelGroup.create_store(self.size, timeout_s)
        authkey = secrets.token_bytes(32)
        directory = tempfile.mkdtemp(prefix="hf-minivllm-tp-")
        address = os.path.join(directory, "socket")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(address)
        server.listen()
        self._processes: list[subprocess.Popen] = []
        self._connections: list[Connection] = []
        self._finalizer = weakref.finalize(self, _stop_workers, self._processes, self._connections, server, directory)
        try:
            env = {**os.environ, **NCCL_ENVIRONMENT, ENV_ADDRESS: address, ENV_AUTHKEY: authkey.hex(),
                   _ENV_SYS_PATH: os.pathsep.join(path or os.getcwd() for path in sys.path)}
            for rank in range(1, self.size):
                self._processes.append(subprocess.Popen(
                    [sys.executable, "-c", _WORKER_ENTRY], env={**env, ENV_RANK: str(rank)},
                    start_new_session=True,  # Ctrl-C reaches rank 0, which stops its workers
                ))
            self._connections += self._accept_all(server, authkey)
            threads = max(1, (os.cpu_count() or 1) // self.size)
            for rank, connection in enumerate(self._connections, start=1):
                send_message(connection, ("group", rank, self.size, store.port, str(devices[rank]), threads, timeout_s))
            self.group = self._join_group(store)
            # Collected without close(): the abort, not waited for (the runner's graphs may be freed later in the
            # same collection, and the abort waits for them; see ParallelGroup.close).
            weakref.finalize(self, self.group.close, 0.0)
        except BaseException:
            self.close()
            raise

    def _accept_all(self, server: socket.socket, authkey: bytes) -> list[Connection]:
        """Each worker's connection, in rank order; raises if a worker exits first or the timeout passes."""
        accepted: dict[int, Connection] = {}
        server.settimeout(_POLL_S * 20)
        deadline = time.monotonic() + self.timeout_s
        while len(accepted) < self.size - 1:
            dead = [rank for rank, process in enumerate(self._processes, start=1) if process.poll() is not None]
            if dead or time.monotonic() > deadline:
                what = f"worker rank {dead[0]} exited while starting" if dead else "the workers did not start in time"
                raise TensorParallelError(f"tensor parallelism could not start: {what}")
            try:
                sock, _ = server.accept()
            except TimeoutError:
                continue
            sock.setblocking(True)
            connection = Connection(sock.detach())
            deliver_challenge(connection, authkey)
            answer_challenge(connection, authkey)
            accepted[receive_message(connection)[1]] = connection
        return [accepted[rank] for rank in range(1, self.size)]

    def _join_group(self, store: Any) -> ParallelGroup:
        """Rank 0's side of the group's rendezvous, watching the workers meanwhile: a worker that fails before it
        joins (its device cannot be set up, say) would otherwise leave rank 0 waiting out the whole timeout, then
        raising a store timeout that does not name the cause. Given up on, the rendezvous thread ends at its
        timeout."""
        outcome: dict[str, Any] = {}

        def join() -> None:
            device = self.devices[0]
            try:
                with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                    outcome["group"] = ParallelGroup.connect(0, self.size, store.port, device, self.timeout_s,
                                                             store=store)
            except BaseException as error:  # noqa: BLE001 - raised on the caller's thread below
                outcome["error"] = error

        thread = threading.Thread(target=join, name="hf-minivllm-tp-rendezvous", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(_POLL_S * 20)
            self.check()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["group"]

    # Commands ---------------------------------------------------------------------------------------------------

    def _send_all(self, *message: Any) -> None:
        self.check()
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for connection in self._connections:
            try:
                connection.send_bytes(data)
            except OSError as error:
                self.check(error)
                raise TensorParallelError("a tensor-parallel worker is gone") from error

    def _wait_replies(self) -> None:
        """Wait for every worker's reply to the last command, watching that they stay alive."""
        deadline = time.monotonic() + self.timeout_s
        for connection in self._connections:
            while not connection.poll(_POLL_S * 20):
                self.check()
                if time.monotonic() > deadline:  # its late answer would be taken for the next command's
                    self.fail(f"a worker did not answer in {self.timeout_s:.0f} s")
                    self.check()
            self._read(connection)

    def _read(self, connection: Connection) -> None:
        try:
            kind, payload = receive_message(connection)
        except (EOFError, OSError) as error:
            self.check(error)
            raise TensorParallelError("a tensor-parallel worker closed its connection") from error
        if kind == "error":
            self._failure = payload
            self.check()

    def load(self, decoder_of_rank: Callable[[int], DecoderForCausalLM]) -> None:
        """Give each worker its decoder: ``decoder_of_rank(rank)`` (views of that rank's shards) is built and sent one
        rank at a time, each parameter straight to its worker. A failure part way leaves the ranks holding
        different models: it is fatal."""
        with self._fatal("sending the weights"):
            for rank, connection in enumerate(self._connections, start=1):
                decoder = decoder_of_rank(rank)
                self.check()
                send_message(connection, ("load", portable_config(decoder), manifest(decoder)))
                send_weights(self.group, decoder, rank)
                del decoder
            self._wait_replies()

    def refresh(self, own: DecoderForCausalLM, decoder_of_rank: Callable[[int], DecoderForCausalLM]) -> None:
        """New values of the same weights (the HF model was trained): every rank overwrites its shards in place.
        A failure part way is fatal, as for ``load``."""
        with self._fatal("refreshing the weights"):
            copy_weights(decoder_of_rank(0), own)
            for rank, connection in enumerate(self._connections, start=1):
                self.check()
                send_message(connection, ("refresh",))
                send_weights(self.group, decoder_of_rank(rank), rank)
            self._wait_replies()

    @contextlib.contextmanager
    def _fatal(self, what: str) -> Iterator[None]:
        try:
            yield
        except BaseException as error:
            self.check(error)
            self.fail(f"{what} failed ({error!r})")
            raise TensorParallelError(f"tensor parallelism broke while {what}: {error!r}") from error

    def fail(self, reason: str) -> None:
        """Mark the ranks out of step (rank 0 failed alone, a command half done): every later use raises."""
        if self._failure is None:
            self._failure = reason

    def start_runner(self, config: Config, eos_token_ids: list[int]) -> None:
        """Workers build their runners (KV cache, CUDA graphs) alongside rank 0's, sharing its collectives."""
        self._send_all("start_runner", dataclasses.replace(config, model=None), eos_token_ids)

    def wait_ready(self) -> None:
        self._wait_replies()

    def step(self, plan: StepPlan) -> None:
        """Hand a step's plan to every worker (no reply: they run it alongside rank 0)."""
        self._send_all("step", plan)

    @property
    def closed(self) -> bool:
        """Stopped, or broken by a failed worker."""
        return not self._finalizer.alive or self._failure is not None

    def close_runner(self) -> None:
        if not self.closed:
            self._send_all("close_runner")
            self._wait_replies()

    def wait(self, event: torch.cuda.Event) -> None:
        """Wait for ``event`` on rank 0's device while checking on the workers: a dead peer would leave rank 0's
        collectives waiting forever."""
        checked = time.monotonic()
        while not event.query():
            time.sleep(0)
            if time.monotonic() - checked > _POLL_S:
                self.check()
                checked = time.monotonic()

    def check(self, error: BaseException | None = None) -> None:
        """Raise ``TensorParallelError`` (from ``error``) if a worker failed or exited; return otherwise. Given the
        ``error`` a collective raised, first give a failing worker a moment to exit, so its own cause is reported."""
        deadline = time.monotonic() + (2.0 if error is not None else 0.0)
        while self._failure is None:
            for rank, (process, connection) in enumerate(zip(self._processes, self._connections), start=1):
                if process.poll() is not None:
                    self._failure = self._last_words(connection) or f"worker rank {rank} exited ({process.returncode})"
                    break
            if time.monotonic() >= deadline:
                break
            time.sleep(_POLL_S)
        if self._failure is not None:
            raise TensorParallelError(f"a tensor-parallel worker failed: {self._failure}") from error

    @staticmethod
    def _last_words(connection: Connection) -> str | None:
        """The traceback an exited worker sent before it went, if any."""
        try:
            while connection.poll():
                kind, payload = receive_message(connection)
                if kind == "error":
                    return payload
        except (EOFError, OSError):
            pass
        return None

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    def close(self) -> None:
        """Stop the workers, then abort rank 0's communicator (idempotent; the runner's graphs are gone by now)."""
        self._finalizer()
        if self.group is not None:
            self.group.close()


def _stop_workers(processes: list[subprocess.Popen], connections: list[Connection], server: socket.socket,
                  directory: str) -> None:
    """Ask each worker to exit, then kill what is left; close the sockets and remove the socket's folder."""
    for connection in connections:
        try:
            send_message(connection, ("shutdown",))
        except OSError:
            pass
    deadline = time.monotonic() + 5.0
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for connection in connections:
        connection.close()
    server.close()
    shutil.rmtree(directory, ignore_errors=True)
