"""Vocab-parallel token embedding and LM head: each rank holds a contiguous slice of the vocabulary.

A vocabulary that does not divide by the number of ranks is padded at its end: the last rank's slice has zero rows
past the real vocabulary, which no token id selects and whose logits are cut off after the gather.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hf_minivllm.layers.parallel import ParallelGroup


class VocabParallelEmbedding(nn.Module):
    """Embedding lookup over this rank's vocab rows; ids owned by other ranks give zeros, summed by all-reduce."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_rank: int = 0, tp_size: int = 1,
                 group: ParallelGroup | None = None):
        super().__init__()
        self.tp_rank, self.tp_size, self.group = tp_rank, tp_size, group
        self.num_embeddings = num_embeddings
        self.shard_size = -(-num_embeddings // tp_size)
        self.vocab_start = tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, embedding_dim), requires_grad=False)

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's vocab rows of a full ``[vocab, hidden]`` tensor: a view, or a zero-padded copy for the last
        rank of a vocabulary that does not divide evenly."""
        rows = full[self.vocab_start : self.vocab_start + self.shard_size]
        if rows.shape[0] == self.shard_size:
            return rows
        return torch.cat([rows, rows.new_zeros(self.shard_size - rows.shape[0], *rows.shape[1:])])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        owned = (local >= 0) & (local < self.shard_size)
        y = F.embedding(local.masked_fill(~owned, 0), self.weight) * owned.unsqueeze(-1).to(self.weight.dtype)
        self.group.all_reduce(y)
        return y


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection onto the vocabulary; may share its weight with the embedding (tied)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden_states, self.weight)
        if self.tp_size > 1:
            logits = self.group.all_gather(logits)
            if logits.shape[-1] != self.num_embeddings:
                logits = logits[..., : self.num_embeddings].contiguous()
        return logits
