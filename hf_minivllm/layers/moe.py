"""The sparse MoE block of Qwen3-MoE style decoders: a router picks each token's top-k experts, the fused expert
kernel computes their gated MLPs and the routing-weighted sum.

The math and dtypes are transformers' (``Qwen3MoeTopKRouter``, ``Qwen3MoeExperts``): router logits in the model
dtype, softmax in float32, top-k, renormalisation in float32 when ``norm_topk_prob``, then the weights cast back to
the logits' dtype. Tensor parallelism shards every expert's intermediate dimension over the ranks (each rank holds
a slice of every expert, the router whole) and all-reduces the block's output once, as the dense MLP does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hf_minivllm.kernels.fused_moe import fused_moe, fused_moe_torch
from hf_minivllm.layers.parallel import ParallelGroup


@dataclass(frozen=True)
class MoeConfig:
    """The experts of the sparse layers (sizes unsharded), and which layers are sparse (the others are dense)."""

    num_experts: int
    top_k: int
    intermediate_size: int
    norm_topk_prob: bool
    sparse_layers: tuple[int, ...]


class TopKRouter(nn.Module):
    """``hidden -> (weights [T, k] in the model dtype, expert ids [T, k])``; replicated on every rank."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool):
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(logits.dtype), ids


class FusedExperts(nn.Module):
    """Every expert's gated MLP, stacked as transformers stores them: ``gate_up_proj [E, 2I, H]`` (``[gate | up]``)
    and ``down_proj [E, H, I]``, ``I`` being this rank's share of the intermediate size."""

    def __init__(self, hidden_size: int, num_experts: int, intermediate_size: int, tp_rank: int = 0,
                 tp_size: int = 1):
        super().__init__()
        if intermediate_size % tp_size:
            raise ValueError(f"{intermediate_size} is not divisible by the tensor-parallel size {tp_size}")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.intermediate_size = intermediate_size // tp_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * self.intermediate_size, hidden_size),
                                         requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, self.intermediate_size),
                                      requires_grad=False)

    def _rank_slice(self) -> slice:
        return slice(self.tp_rank * self.intermediate_size, (self.tp_rank + 1) * self.intermediate_size)

    def shard_gate_up(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's ``[gate | up]`` rows of every expert, from the full ``[E, 2I, H]`` (a new tensor)."""
        gate, up = full.chunk(2, dim=1)
        return torch.cat([gate[:, self._rank_slice()], up[:, self._rank_slice()]], dim=1)

    def shard_down(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's input columns of every expert's down projection (a view)."""
        return full[..., self._rank_slice()]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        experts = fused_moe if x.is_cuda else fused_moe_torch
        return experts(x, self.gate_up_proj, self.down_proj, weights, ids)


class SparseMoeBlock(nn.Module):
    """Router, then the fused experts; sums the ranks' partial outputs once."""

    def __init__(self, hidden_size: int, config: MoeConfig, tp_rank: int = 0, tp_size: int = 1,
                 group: ParallelGroup | None = None):
        super().__init__()
        self.tp_size, self.group = tp_size, group
        self.gate = TopKRouter(hidden_size, config.num_experts, config.top_k, config.norm_topk_prob)
        self.experts = FusedExperts(hidden_size, config.num_experts, config.intermediate_size, tp_rank, tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        if self.tp_size > 1:
            self.group.all_reduce(out)
        return out
