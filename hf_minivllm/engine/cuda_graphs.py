"""CUDA graphs for decode and small prefill passes, replayed over static input buffers.

Decode: one graph per batch-size bucket runs the whole decode forward and the LM head for up to ``bucket``
sequences. The block-table buffer is as wide as ``max_model_len`` needs, so any admitted sequence fits. Padding rows
write no KV (slot -1) and attend to one token of block 0, so they stay finite and never touch a live sequence's
cache.

Prefill: one graph per token-count bucket runs a packed prefill pass (prompt chunks, and in a one-pass mixed step
the decode tokens too) over up to ``max_seqs`` sequences, and the LM head over ``max_seqs`` rows. An eager prefill
of a small model is launch-bound (tens of kernels per layer, each launched from Python): a step carrying a short
prompt cost ~20 ms of host time against ~2 ms for a graph-replayed decode step, and every running stream waited for
it. Padding tokens belong to no sequence: they write no KV, no query tile covers them (their attention output is
whatever the buffer held), and every other layer works row by row, so they never reach a real token. Padding
sequences have no tokens and exit at once; the attention grid is sized for the bucket's tokens in every sequence.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from hf_minivllm.layers.context import AttentionMetadata, set_attention_metadata

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from hf_minivllm.engine.model_runner import ModelRunner
    from hf_minivllm.engine.step_plan import PrefillPlan


@dataclass
class DecodeInputs:
    """One decode step's inputs in (pinned) host memory.

    ``rows`` [3, n] int64: input ids, positions, KV slots; ``context_lens`` [n] int32; ``block_tables`` [n, w] int32.
    With async scheduling some input ids are still on the device: ``previous_rows`` [n] int64 gives each row's index
    into ``previous_tokens`` (the step in flight's sampled tokens, on the device), -1 where ``rows[0]`` holds it.
    """

    rows: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    previous_rows: torch.Tensor | None = None
    previous_tokens: torch.Tensor | None = None

    def fill_pending_input_ids(self, input_ids: torch.Tensor) -> None:
        """Overwrite the device ``input_ids`` of rows whose token the previous step sampled (no host sync)."""
        if self.previous_rows is None:
            return
        rows = self.previous_rows.to(input_ids.device, non_blocking=True)
        from_previous = self.previous_tokens[rows.clamp(min=0)]
        input_ids.copy_(torch.where(rows >= 0, from_previous, input_ids))


def capture_graph(model: torch.nn.Module, variant_layers: list[int], forward: Callable[[], None], pool,
                  stream: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
    """Run ``forward`` once through the model's variant layers (``ModelRunner.variant_layers``), then capture the
    whole of it on ``stream``.

    The pass before the capture loads each Triton kernel variant the capture launches (a module load is not allowed
    while a stream captures), and another layer of a kind launches the same variants: a whole forward would cost
    each bucket its Python launches twice. The capture is ``torch.cuda.graph``'s without the ``empty_cache`` it runs
    per graph, which handed every cached block back to the driver for the next bucket to allocate again; callers
    empty the cache once before a series of captures (while a stream captures, the allocator cannot hand cached
    blocks back to make room). Captures that share a ``pool`` must share the ``stream`` too: the allocator reuses a
    freed block only on the stream that allocated it."""
    with model.only_layers(variant_layers):
        forward()
    graph = torch.cuda.CUDAGraph()
    pool = torch.cuda.graph_pool_handle() if pool is None else pool  # known even if the capture fails
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # thread_local: another engine's loop thread may be running CUDA work meanwhile.
        graph.capture_begin(pool, capture_error_mode="thread_local")
        try:
            forward()
        except BaseException:
            _end_capture(graph, pool, stream.device, forward_failed=True)
            raise
        _end_capture(graph, pool, stream.device)
    torch.cuda.current_stream().wait_stream(stream)
    return graph


def _end_capture(graph: torch.cuda.CUDAGraph, pool, device: torch.device, forward_failed: bool = False) -> None:
    """End the capture. Where the forward raised, its error is the one the caller sees."""
    try:
        graph.capture_end()
    except Exception:
        try:
            _undo_failed_capture(graph, pool, device)
        except Exception:  # noqa: BLE001 - the capture's own error says more
            logger.warning("could not undo what a failed CUDA graph capture left behind", exc_info=True)
        if not forward_failed:
            raise
        logger.debug("ending a failed CUDA graph capture raised", exc_info=True)


def _undo_failed_capture(graph: torch.cuda.CUDAGraph, pool, device: torch.device) -> None:
    """What a capture that cannot end (an operation it does not allow invalidated it) leaves behind, up to at least
    torch 2.11, all process-wide:

    - the caching allocator still routes to the capture's pool: ``empty_cache`` then hands nothing back to the
      driver, and freed memory (a closed engine's KV cache) stays reserved for good;
    - the pool keeps the reference the capture took (a graph gives it back only after a capture that ended): a pool
      shared with other graphs would never be freed;
    - torch's CUDA default generator stays in capture mode: every later random draw on the device raises, the
      user's own ones too (dropout in a training step).

    (Pinned host memory that newer torch routes to the pool during a capture has no Python-side undo.)"""
    end_routing = (getattr(torch._C, "_cuda_endAllocateToPool", None)  # torch 2.8 on
                   or getattr(torch._C, "_cuda_endAllocateCurrentStreamToPool", None))
    try:
        if end_routing is not None:
            end_routing(device.index, pool)
    except RuntimeError:  # "not currently recording": this torch ended the routing itself
        pass
    try:
        graph.pool()
    except RuntimeError:  # no capture that ended: the graph will not give the pool's reference back
        release = getattr(torch._C, "_cuda_releasePool", None)
        if release is not None:
            release(device.index, pool)
    _end_generator_capture(device)


def _end_generator_capture(device: torch.device) -> None:
    """Capture (and drop) a one-kernel graph on the current stream: a capture that ends takes torch's CUDA default
    generator out of capture mode."""
    scratch = torch.zeros(1, device=device)
    graph = torch.cuda.CUDAGraph()
    graph.capture_begin(capture_error_mode="thread_local")
    scratch.zero_()
    graph.capture_end()


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (and max_num_seqs itself)."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    buckets += list(range(16, max_num_seqs, 16)) + [max_num_seqs]
    return sorted(set(buckets))


class DecodeGraphs:
    """One decode graph per batch bucket, captured at start-up; and for the buckets a cascade step (a shared prefix,
    see ``AttentionMetadata.shared_prefix_len``) first needs, a cascade graph captured then: most engines never
    decode over a shared prefix, and capturing them all would lengthen every start."""

    def __init__(self, runner: "ModelRunner", max_num_seqs: int):
        model, device = runner.model, runner.device
        self.model, self.device = model, device
        self.buckets = batch_buckets(max_num_seqs)
        largest = self.buckets[-1]
        self.input_ids = torch.zeros(largest, dtype=torch.int64, device=device)
        self.positions = torch.zeros(largest, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((largest,), -1, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(largest, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(largest, runner.max_blocks_per_seq, dtype=torch.int32, device=device)
        self.shared_prefix_len = torch.zeros(1, dtype=torch.int32, device=device)
        self.logits = torch.empty(largest, model.vocab_size, dtype=runner.dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.cascade_graphs: dict[int, torch.cuda.CUDAGraph | None] = {}  # None: its capture failed
        self.pool = None
        self.variant_layers = runner.variant_layers
        self.capture_stream = torch.cuda.Stream(device)
        torch.cuda.empty_cache()
        with torch.inference_mode():
            for bucket in reversed(self.buckets):
                self.graphs[bucket] = self._capture(bucket, cascade=False)
        torch.cuda.synchronize(device)

    def _capture(self, bucket: int, cascade: bool) -> torch.cuda.CUDAGraph:
        set_attention_metadata(self._metadata(bucket, cascade))
        try:
            graph = capture_graph(self.model, self.variant_layers, lambda: self._forward(bucket), self.pool,
                                  self.capture_stream)
        finally:
            set_attention_metadata(None)
        self.pool = graph.pool()
        return graph

    def _metadata(self, bucket: int, cascade: bool) -> AttentionMetadata:
        return AttentionMetadata(
            is_prefill=False,
            slot_mapping=self.slot_mapping[:bucket],
            block_tables=self.block_tables[:bucket],
            context_lens=self.context_lens[:bucket],
            shared_prefix_len=self.shared_prefix_len if cascade else None,
        )

    def _forward(self, bucket: int) -> None:
        hidden = self.model(self.input_ids[:bucket], self.positions[:bucket])
        self.logits[:bucket] = self.model.compute_logits(hidden)

    def can_run(self, batch_size: int) -> bool:
        return batch_size <= self.buckets[-1]

    def release(self) -> None:
        """Destroy the graphs now (see ``release_graphs``)."""
        release_graphs(self.graphs)
        release_graphs(self.cascade_graphs)

    def run(self, inputs: DecodeInputs, shared_prefix_len: int = 0) -> torch.Tensor:
        """Copy the host inputs straight into the static buffers (no intermediate device tensors), then replay; with
        ``shared_prefix_len``, the bucket's cascade graph (captured now if this is its first cascade step)."""
        n = inputs.rows.shape[1]
        bucket = next(b for b in self.buckets if b >= n)
        self.input_ids[:n].copy_(inputs.rows[0], non_blocking=True)
        inputs.fill_pending_input_ids(self.input_ids[:n])
        self.positions[:n].copy_(inputs.rows[1], non_blocking=True)
        self.slot_mapping[:n].copy_(inputs.rows[2], non_blocking=True)
        self.slot_mapping[n:bucket] = -1
        self.context_lens[:n].copy_(inputs.context_lens, non_blocking=True)
        # Padding rows: one token, which a cascade's shared prefix (shorter than every real row) may not cover.
        self.context_lens[n:bucket] = 1
        width = inputs.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(inputs.block_tables, non_blocking=True)
        self.block_tables[n:bucket] = 0
        if not shared_prefix_len:
            self.graphs[bucket].replay()
            return self.logits[:n]
        self.shared_prefix_len.fill_(shared_prefix_len)
        if bucket not in self.cascade_graphs:
            self.cascade_graphs[bucket] = self._capture_cascade(bucket)
        graph = self.cascade_graphs[bucket] or self.graphs[bucket]  # the plain graph attends to the prefix as well
        graph.replay()
        return self.logits[:n]

    def _capture_cascade(self, bucket: int) -> torch.cuda.CUDAGraph | None:
        """The bucket's cascade graph; None where its capture ran out of memory (the KV cache may have grown into
        what start-up left free), so that its steps keep the plain graph rather than failing."""
        try:
            torch.cuda.empty_cache()  # see capture_graph: the KV cache or other work may hold what it needs
            return self._capture(bucket, cascade=True)
        except torch.OutOfMemoryError:
            logger.warning("no memory to capture the cascade-attention graph for %d sequences; those steps read the "
                           "shared prefix once per sequence", bucket, exc_info=True)
            return None


def release_graphs(graphs: dict[int, torch.cuda.CUDAGraph | None]) -> None:
    """Destroy each graph now rather than whenever its Python object goes: a graph that captured a NCCL collective
    must be gone before its communicator is aborted (since NCCL 2.26 the abort waits for it), and a communicator
    collected in the same garbage cycle as the graphs would otherwise wait for them forever."""
    for graph in graphs.values():
        if graph is not None:
            graph.reset()
    graphs.clear()


def prefill_buckets(max_tokens: int) -> list[int]:
    """Token counts of the prefill graphs: powers of two from 16 below max_tokens, and max_tokens itself (a padded
    pass costs at most twice the tokens' device work, which is what these small passes are not bound by)."""
    buckets = [1 << shift for shift in range(4, max_tokens.bit_length()) if 1 << shift < max_tokens]
    return buckets + [max_tokens] if max_tokens else []


class PrefillGraphs:
    """Prefill passes of up to ``max_tokens`` tokens over up to ``max_seqs`` sequences, one CUDA graph per token
    bucket (see the module doc). ``capture=False`` runs the same padded pass eagerly (the CPU tests' stand-in)."""

    def __init__(self, runner: "ModelRunner", max_tokens: int, max_seqs: int, pool=None,
                 stream: torch.cuda.Stream | None = None, capture: bool = True):
        model, device = runner.model, runner.device
        self.model = model
        self.buckets = prefill_buckets(max_tokens)
        self.max_seqs = max_seqs
        self.max_model_len = runner.config.max_model_len
        largest = self.buckets[-1]
        self.input_ids = torch.zeros(largest, dtype=torch.int64, device=device)
        self.positions = torch.zeros(largest, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((largest,), -1, dtype=torch.int64, device=device)
        # query, key; each row 16-byte aligned (a width of 4 int32s), so that the kernels specialise as for the
        # warm-up's own tensors and the start-up compiles cover them
        self.cu_seqlens = torch.zeros(2, -(-(max_seqs + 1) // 4) * 4, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_seqs, runner.max_blocks_per_seq, dtype=torch.int32, device=device)
        self.logits_rows = torch.zeros(max_seqs, dtype=torch.int64, device=device)
        self.logits = torch.empty(max_seqs, model.vocab_size, dtype=runner.dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replays = 0
        if not capture:
            return
        # The decode graphs' stream with their pool (see capture_graph).
        stream = stream if stream is not None else torch.cuda.Stream(device)
        torch.cuda.empty_cache()
        with torch.inference_mode():
            for bucket in reversed(self.buckets):
                set_attention_metadata(self._metadata(bucket))
                try:
                    graph = capture_graph(model, runner.variant_layers, lambda bucket=bucket: self._forward(bucket),
                                          pool, stream)
                finally:
                    set_attention_metadata(None)
                pool = graph.pool()
                self.graphs[bucket] = graph
        torch.cuda.synchronize(device)

    def _metadata(self, bucket: int) -> AttentionMetadata:
        # max_seqlen_q sizes the attention grid: any sequence may hold all of the bucket's tokens.
        return AttentionMetadata(
            is_prefill=True,
            slot_mapping=self.slot_mapping[:bucket],
            block_tables=self.block_tables,
            cu_seqlens_q=self.cu_seqlens[0, : self.max_seqs + 1],
            cu_seqlens_k=self.cu_seqlens[1, : self.max_seqs + 1],
            max_seqlen_q=bucket,
            max_seqlen_k=self.max_model_len,
        )

    def _forward(self, bucket: int) -> None:
        hidden = self.model(self.input_ids[:bucket], self.positions[:bucket])
        self.logits.copy_(self.model.compute_logits(hidden[self.logits_rows]))

    def release(self) -> None:
        """Destroy the graphs now (see ``release_graphs``)."""
        release_graphs(self.graphs)

    def can_run(self, plan: "PrefillPlan") -> bool:
        return len(plan.input_ids) <= self.buckets[-1] and len(plan.cu_seqlens_q) - 1 <= self.max_seqs

    def run(self, plan: "PrefillPlan", previous_tokens: torch.Tensor | None) -> torch.Tensor | None:
        """Copy the plan into the static buffers (padding as the module doc says), then replay; the sampled rows'
        logits, None when no row samples."""
        num_tokens, num_seqs = len(plan.input_ids), len(plan.cu_seqlens_q) - 1
        bucket = next(b for b in self.buckets if b >= num_tokens)
        pinned = self.model.device.type == "cuda"
        self.input_ids[:num_tokens].copy_(_host(plan.input_ids, pinned), non_blocking=True)
        if plan.pending_offsets is not None:
            device = self.input_ids.device
            pending = previous_tokens[_host(plan.pending_rows, pinned).to(device, non_blocking=True)]
            self.input_ids.index_copy_(0, _host(plan.pending_offsets, pinned).to(device, non_blocking=True), pending)
        self.positions[:num_tokens].copy_(_host(plan.positions, pinned), non_blocking=True)
        self.slot_mapping[:num_tokens].copy_(_host(plan.slot_mapping, pinned), non_blocking=True)
        self.slot_mapping[num_tokens:bucket] = -1
        cu_seqlens = np.empty(tuple(self.cu_seqlens.shape), dtype=np.int32)
        cu_seqlens[0, : num_seqs + 1], cu_seqlens[1, : num_seqs + 1] = plan.cu_seqlens_q, plan.cu_seqlens_k
        cu_seqlens[:, num_seqs + 1 :] = cu_seqlens[:, num_seqs : num_seqs + 1]  # padding sequences hold no tokens
        self.cu_seqlens.copy_(_host(cu_seqlens, pinned), non_blocking=True)
        width = plan.block_tables.shape[1]
        self.block_tables[:num_seqs, :width].copy_(_host(plan.block_tables, pinned), non_blocking=True)
        num_sampled = len(plan.logits_rows)
        rows = np.zeros(self.max_seqs, dtype=np.int64)  # unsampled rows read token 0 (a stale row may be past it)
        rows[:num_sampled] = plan.logits_rows
        self.logits_rows.copy_(_host(rows, pinned), non_blocking=True)
        self.replays += 1
        if bucket in self.graphs:
            self.graphs[bucket].replay()
        else:
            self._run_eagerly(bucket)
        return self.logits[:num_sampled] if num_sampled else None

    def _run_eagerly(self, bucket: int) -> None:
        set_attention_metadata(self._metadata(bucket))
        try:
            self._forward(bucket)
        finally:
            set_attention_metadata(None)


def _host(array: np.ndarray, pinned: bool) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    return tensor.pin_memory() if pinned else tensor
