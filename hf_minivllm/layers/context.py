"""The per-forward attention metadata, set by the model runner and read by every attention layer.

A slot outside the model (as nano-vllm does) keeps the model's forward signature plain (``input_ids, positions``)
so CUDA graphs can capture it; the runner sets the metadata before each forward and resets it after. The slot is
per thread: each engine runs its steps on its own loop thread, so two engines in one process never see each
other's metadata.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where this step's tokens live in the paged KV cache.

    KV cache layout (every backend): per layer ``k_cache`` and ``v_cache`` of shape
    ``[num_blocks, block_size, num_kv_heads, head_dim]``; token ``t`` of a sequence lives in block
    ``block_table[t // block_size]`` at offset ``t % block_size``, i.e. slot ``block * block_size + offset``.

    Prefill: the step holds ``n`` sequences' new tokens packed one after another. ``cu_seqlens_q`` [n+1] (int32)
    delimits each sequence's new (query) tokens; ``cu_seqlens_k`` [n+1] delimits each sequence's whole context
    (cached prefix + new tokens). Query token ``i`` of a sequence sits at position ``context_len - query_len + i``
    and attends causally to context positions ``<=`` its own. Decode: one query token per sequence;
    ``context_lens`` [n] (int32) counts its context including the new token.

    ``slot_mapping`` [num_tokens] (int64) is where each new token's K/V is written; -1 means skip (padding rows of
    a captured CUDA graph). ``block_tables`` [n, width] (int32): only the first ``ceil(context_len / block_size)``
    entries of a row are meaningful; the rest are padding that kernels must not read.

    ``shared_prefix_len`` (decode): [1] int32 on the device, a count of leading tokens every row holds in the same
    pages (a multiple of the block size, below every context length); the Triton backend then reads them once per
    tile of sequences (cascade attention). None: attend as usual.
    """

    is_prefill: bool
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor | None = None
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    shared_prefix_len: torch.Tensor | None = None


_local = threading.local()


def set_attention_metadata(metadata: AttentionMetadata | None) -> None:
    _local.metadata = metadata


def get_attention_metadata() -> AttentionMetadata:
    metadata = getattr(_local, "metadata", None)
    if metadata is None:
        raise RuntimeError("attention layers were called outside a model-runner step (no AttentionMetadata set)")
    return metadata
