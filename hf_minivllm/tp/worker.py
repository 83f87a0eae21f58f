"""A tensor-parallel worker: one rank of a sharded model, in a process of its own (a fresh interpreter running
``main``, started by ``hf_minivllm.tp.workers``).

It connects back to rank 0 over a local socket, joins the ranks' group, and then does what rank 0 says: receive its
decoder's shards, build or close its runner (KV cache, CUDA graphs), run each step's plan (and receive the sampled
tokens, which the next step's pending inputs come from), or exit. A failure is reported to rank 0 with its traceback
and ends the process, as does losing rank 0 (its socket closing or the parent process going away).
"""
from __future__ import annotations

import logging
import os
import pickle
import sys
import threading
import time
import traceback
from multiprocessing.connection import Client, Connection
from typing import Any

import torch

from hf_minivllm.engine.model_runner import ModelRunner
from hf_minivllm.engine.step_plan import StepPlan
from hf_minivllm.layers.parallel import ParallelGroup
from hf_minivllm.tp.weights import receive_decoder, receive_into

logger = logging.getLogger(__name__)

ENV_ADDRESS, ENV_AUTHKEY, ENV_RANK = "HF_MINIVLLM_TP_ADDRESS", "HF_MINIVLLM_TP_AUTHKEY", "HF_MINIVLLM_TP_RANK"


def send_message(connection: Connection, message: tuple) -> None:
    """Plain pickle (not multiprocessing's, which would try to share tensors' memory with a process it did not
    start); numpy arrays travel as raw buffers."""
    connection.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def receive_message(connection: Connection) -> tuple:
    return pickle.loads(connection.recv_bytes())


def _exit_when_orphaned(parent_pid: int) -> None:
    """End this process once rank 0's process is gone (killed without a chance to stop its workers)."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


class Worker:
    """Rank ``group.rank``'s state between commands."""

    def __init__(self, group: ParallelGroup):
        self.group = group
        self.decoder = None
        self.runner: ModelRunner | None = None
        self.previous_tokens: torch.Tensor | None = None

    def step(self, plan: StepPlan) -> None:
        """Run rank 0's plan; when it samples, receive the tokens rank 0 sampled (the next step's pending inputs)."""
        self.runner.run_plan(plan, self.previous_tokens)
        self.previous_tokens = None
        if plan.num_sampled:
            tokens = torch.empty(plan.num_sampled, dtype=torch.int64, device=self.group.device)
            self.group.broadcast(tokens)
            self.previous_tokens = tokens

    def handle(self, command: str, args: tuple) -> bool:
        """Carry out one command (other than ``step``); False when the worker should exit."""
        if command == "load":
            self.close_runner()
            self.decoder = None
            self.decoder = receive_decoder(self.group, *args)
        elif command == "refresh":
            receive_into(self.group, self.decoder)
        elif command == "start_runner":
            config, eos_token_ids = args
            self.close_runner()
            self.runner = ModelRunner(self.decoder, config, eos_token_ids)
        elif command == "close_runner":
            self.close_runner()
        elif command == "shutdown":
            self.close_runner()  # its graphs first: the communicator's abort waits for them
            self.group.close()
            return False
        else:
            raise ValueError(f"unknown command {command!r}")
        return True

    def close_runner(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None
        self.previous_tokens = None


def serve(connection: Connection) -> None:
    """Take the group's coordinates from rank 0, then run its commands until told to stop."""
    _, rank, size, port, device, num_threads, timeout_s = receive_message(connection)
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(num_threads)
    worker = Worker(ParallelGroup.connect(rank, size, port, device, timeout_s))
    while True:
        message: tuple[Any, ...] = receive_message(connection)
        command, args = message[0], message[1:]
        if command == "step":
            worker.step(args[0])
            continue
        if not worker.handle(command, args):
            return
        send_message(connection, ("ok", None))


def main() -> None:
    rank = int(os.environ[ENV_RANK])
    connection = Client(os.environ[ENV_ADDRESS], family="AF_UNIX", authkey=bytes.fromhex(os.environ[ENV_AUTHKEY]))
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    send_message(connection, ("rank", rank))
    try:
        serve(connection)
    except EOFError:  # rank 0 closed the connection: the engine is gone
        os._exit(1)
    except BaseException:  # noqa: BLE001 - reported to rank 0, which raises it in the caller
        # Also on this process's stderr (rank 0's): should rank 0 be blocked in its device, waiting for this rank's
        # part of a collective, it never reads the report.
        logger.exception("tensor-parallel worker rank %d failed", rank)
        try:
            send_message(connection, ("error", traceback.format_exc()))
        finally:
            os._exit(1)
    connection.close()
    sys.stdout.flush()
    os._exit(0)  # no teardown of communicators whose peers may already be gone
