"""What one step computes, as plain numpy arrays: built on the host by rank 0's runner from the scheduled batch,
run by every rank (``ModelRunner.run_plan``).

Tensor-parallel workers receive each step's plan as it is (a few small arrays; no tensors, no sequences), so every
rank runs the same forward pass without knowing about requests, and only rank 0 samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PrefillPlan:
    """Prompt chunks (and, in a mixed step, decode tokens) packed along one axis.

    ``pending_offsets``/``pending_rows``: positions in ``input_ids`` whose token the step in flight sampled (still
    on the device), and their rows in that step's sampled tokens. ``logits_rows``: the token rows to sample from.
    """

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64, rows of the rotary cache: the positions, LongRoPE aside (ModelRunner)
    slot_mapping: np.ndarray  # [T] int64
    block_tables: np.ndarray  # [n, w] int32
    cu_seqlens_q: np.ndarray  # [n + 1] int32
    cu_seqlens_k: np.ndarray  # [n + 1] int32
    max_seqlen_q: int
    max_seqlen_k: int
    logits_rows: np.ndarray  # [sampled] int64
    pending_offsets: np.ndarray | None = None  # [p] int64
    pending_rows: np.ndarray | None = None  # [p] int64


@dataclass
class DecodePlan:
    """One token per sequence. ``rows`` [3, n] int64: input ids, positions, KV slots; ``previous_rows`` [n] int64:
    each row's index into the step in flight's sampled tokens, -1 where ``rows[0]`` holds the input id.
    ``shared_prefix_len``: tokens every row holds in the same pages, attended once per tile of rows (cascade
    attention); 0 runs the step as usual."""

    rows: np.ndarray
    context_lens: np.ndarray  # [n] int32
    block_tables: np.ndarray  # [n, w] int32
    previous_rows: np.ndarray | None = None
    shared_prefix_len: int = 0


@dataclass
class StepPlan:
    """A step: a decode part (through a CUDA graph when captured), a prefill part, or both (a mixed step in two
    passes); ``num_sampled`` rows are sampled, decode rows first."""

    decode: DecodePlan | None
    prefill: PrefillPlan | None
    num_sampled: int
