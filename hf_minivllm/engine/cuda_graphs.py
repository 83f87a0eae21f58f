"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed over static input buffers.

Each bucket's graph runs the whole decode forward and the LM head for up to ``bucket`` sequences. The block-table
buffer is as wide as ``max_model_len`` needs, so any admitted sequence fits. Padding rows write no KV (slot -1) and
attend to one token of block 0, so they stay finite and never touch a live sequence's cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hf_minivllm.layers.context import AttentionMetadata, set_attention_metadata

if TYPE_CHECKING:
    from hf_minivllm.engine.model_runner import ModelRunner


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


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (and max_num_seqs itself)."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    buckets += list(range(16, max_num_seqs, 16)) + [max_num_seqs]
    return sorted(set(buckets))


class DecodeGraphs:
    def __init__(self, runner: "ModelRunner", max_num_seqs: int):
        model, device = runner.model, runner.device
        self.buckets = batch_buckets(max_num_seqs)
        largest = self.buckets[-1]
        self.input_ids = torch.zeros(largest, dtype=torch.int64, device=device)
        self.positions = torch.zeros(largest, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((largest,), -1, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(largest, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(largest, runner.max_blocks_per_seq, dtype=torch.int32, device=device)
        self.logits = torch.empty(largest, model.vocab_size, dtype=runner.dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = None
        with torch.inference_mode():
            for bucket in reversed(self.buckets):
                metadata = self._metadata(bucket)
                set_attention_metadata(metadata)
                try:
                    self._forward(model, bucket)  # warm-up: Triton compiles and autotuning stay out of the graph
                    graph = torch.cuda.CUDAGraph()
                    # thread_local: another engine's loop thread may be running CUDA work meanwhile.
                    with torch.cuda.graph(graph, pool, capture_error_mode="thread_local"):
                        self._forward(model, bucket)
                finally:
                    set_attention_metadata(None)
                pool = graph.pool()
                self.graphs[bucket] = graph
        torch.cuda.synchronize(device)

    def _metadata(self, bucket: int) -> AttentionMetadata:
        return AttentionMetadata(
            is_prefill=False,
            slot_mapping=self.slot_mapping[:bucket],
            block_tables=self.block_tables[:bucket],
            context_lens=self.context_lens[:bucket],
        )

    def _forward(self, model, bucket: int) -> None:
        hidden = model(self.input_ids[:bucket], self.positions[:bucket])
        self.logits[:bucket] = model.compute_logits(hidden)

    def can_run(self, batch_size: int) -> bool:
        return batch_size <= self.buckets[-1]

    def run(self, inputs: DecodeInputs) -> torch.Tensor:
        """Copy the host inputs straight into the static buffers (no intermediate device tensors), then replay."""
        n = inputs.rows.shape[1]
        bucket = next(b for b in self.buckets if b >= n)
        self.input_ids[:n].copy_(inputs.rows[0], non_blocking=True)
        inputs.fill_pending_input_ids(self.input_ids[:n])
        self.positions[:n].copy_(inputs.rows[1], non_blocking=True)
        self.slot_mapping[:n].copy_(inputs.rows[2], non_blocking=True)
        self.slot_mapping[n:bucket] = -1
        self.context_lens[:n].copy_(inputs.context_lens, non_blocking=True)
        self.context_lens[n:bucket] = 1
        width = inputs.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(inputs.block_tables, non_blocking=True)
        self.block_tables[n:bucket] = 0
        self.graphs[bucket].replay()
        return self.logits[:n]
