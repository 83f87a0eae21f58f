"""The ranks one model is sharded over, and the few collectives tensor-parallel layers and workers need.

Each group has its own store and process group (never ``torch.distributed``'s process-wide default group), so two
engines in one process, or on one host, never share or collide: the store listens on a port the OS picks. NCCL
on CUDA, gloo on CPU. Collectives run on the caller's current CUDA stream and can be captured in CUDA graphs.
"""
from __future__ import annotations

import datetime
import logging
import os
import threading

import torch
import torch.distributed as dist

from hf_minivllm.layers.peer_memory import PeerAllReduce

# NVLink multicast (NVLS) stays off in every process of an engine (rank 0 included: all ranks must agree).
NCCL_ENVIRONMENT = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# Unless the caller chose otherwise: a collective that times out (a peer died) aborts the communicator but does not
# kill the process (rank 0 is the caller's own program), and no watchdog monitor kills it either. The engine
# notices a dead worker by itself and raises.
NCCL_FAILURE_HANDLING = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2", "TORCH_NCCL_ENABLE_MONITORING": "0"}
# How long ``close`` waits for the communicator's abort (which runs on a thread of its own).
ABORT_WAIT_S = 5.0

logger = logging.getLogger(__name__)


class ParallelGroup:
    """Rank ``rank`` of ``size`` processes computing one model together; ``device`` is this rank's device."""

    def __init__(self, rank: int, size: int, process_group: dist.ProcessGroup, device: torch.device,
                 store: dist.Store, peer_all_reduce: PeerAllReduce | None = None):
        self.rank, self.size, self.device = rank, size, device
        self.process_group = process_group
        self.peer_all_reduce = peer_all_reduce  # small all-reduces through peer memory instead of NCCL
        self._store = store  # keeps the rendezvous alive as long as the group
        self._closed = False

    def close(self, wait_s: float = ABORT_WAIT_S) -> None:
        """Abort this rank's communicator now (idempotent; the group takes no collectives after it). Left to its
        destructor, the communicator hung the thread that garbage-collected it (a TP test on 2 x H200). An abort
        involves no peer; it waits only until the CUDA graphs that captured its collectives are destroyed (NCCL
        2.26 on), which the runners do before an explicit close. It runs on a thread of its own, waited for
        ``wait_s`` at most, so that a graph still alive (a peer died mid-step, or the garbage collector has not
        reached the graphs yet: pass 0 there) cannot hang the caller."""
        if self._closed:
            return
        self._closed = True
        abort = getattr(self.process_group, "abort", None)  # PyTorch 2.7 on
        if abort is None:
            return
        aborter = threading.Thread(target=abort, name="hf-minivllm-tp-abort", daemon=True)
        aborter.start()
        aborter.join(wait_s)
        if wait_s and aborter.is_alive():
            logger.warning("rank %d's communicator did not abort within %.0f s; left to end with the process",
                           self.rank, wait_s)

    @classmethod
    def create_store(cls, size: int, timeout_s: float) -> dist.TCPStore:
        """Rank 0's store, on a free local port (``store.port``); the other ranks join it with ``connect``."""
        return dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
                             wait_for_workers=False)

    @classmethod
    def connect(cls, rank: int, size: int, port: int, device: torch.device, timeout_s: float,
                store: dist.TCPStore | None = None) -> ParallelGroup:
        """Join the group whose rank 0 listens on ``port`` (rank 0 passes its own ``store``)."""
        timeout = datetime.timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=timeout)
        prefixed = dist.PrefixStore("hf_minivllm_tp", store)
        if device.type == "cuda":
            os.environ.update(NCCL_ENVIRONMENT)
            for name, value in NCCL_FAILURE_HANDLING.items():
                os.environ.setdefault(name, value)
            options = dist.ProcessGroupNCCL.Options()
            if hasattr(options, "_timeout"):
                options._timeout = timeout
            group = dist.ProcessGroupNCCL(prefixed, rank, size, options)
            peer = PeerAllReduce.create(rank, size, device, prefixed)
            return cls(rank, size, group, device, store, peer)
        return cls(rank, size, dist.ProcessGroupGloo(prefixed, rank, size, timeout), device, store)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the ranks, in place: small tensors through peer memory (one kernel, same result on
        every rank), the rest through NCCL."""
        if self.peer_all_reduce is not None and self.peer_all_reduce.fits(tensor):
            self.peer_all_reduce.all_reduce(tensor)
        else:
            self.process_group.allreduce([tensor]).wait()

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along the last dimension, in rank order."""
        shards = [torch.empty_like(tensor) for _ in range(self.size)]
        self.process_group.allgather([shards], [tensor.contiguous()]).wait()
        return torch.cat(shards, dim=-1)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Overwrite ``tensor`` on every rank with rank ``src``'s."""
        options = dist.BroadcastOptions()
        options.rootRank = src
        self.process_group.broadcast([tensor], options).wait()

    def min(self, value: int) -> int:
        """The smallest ``value`` any rank passes (every rank gets it)."""
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.MIN
        self.process_group.allreduce([tensor], options).wait()
        return int(tensor.item())

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.process_group.send([tensor.contiguous()], dst, 0).wait()

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        self.process_group.recv([tensor], src, 0).wait()
