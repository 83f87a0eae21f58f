"""Vocab-parallel token embedding and LM head: each rank holds a contiguous slice of the vocabulary."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class VocabParallelEmbedding(nn.Module):
    """Embedding lookup over this rank's vocab rows; ids owned by other ranks give zeros, summed by all-reduce."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        if num_embeddings % tp_size:
            raise ValueError(f"vocab size {num_embeddings} is not divisible by the tensor-parallel size {tp_size}")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.num_embeddings = num_embeddings
        self.shard_size = num_embeddings // tp_size
        self.vocab_start = tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, embedding_dim), requires_grad=False)

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's vocab rows of a full ``[vocab, hidden]`` tensor (a view)."""
        return full[self.vocab_start : self.vocab_start + self.shard_size]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        owned = (local >= 0) & (local < self.shard_size)
        y = F.embedding(local.masked_fill(~owned, 0), self.weight) * owned.unsqueeze(-1).to(self.weight.dtype)
        dist.all_reduce(y)
        return y


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection onto the vocabulary; may share its weight with the embedding (tied)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden_states, self.weight)
        if self.tp_size > 1:
            shards = [torch.empty_like(logits) for _ in range(self.tp_size)]
            dist.all_gather(shards, logits)
            logits = torch.cat(shards, dim=-1)
        return logits
