"""Tensor-parallel linear layers (Megatron style): column-parallel splits outputs, row-parallel splits inputs.

Weights are ``[out_features, in_features]`` as in ``nn.Linear``. Parameters are created by the caller's device
context (the adapter builds the model on ``meta`` and then assigns the HF tensors), never initialised here.
``shard`` helpers turn a full HF weight into this rank's slice, so tensor-parallel loading lives beside the layer
that consumes it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hf_minivllm.kernels.gemv import gemv
from hf_minivllm.layers.parallel import ParallelGroup

# Half-precision projections on CUDA of at most this many rows, onto at most half as many features as they read,
# run through kernels/gemv.py; the rest through cuBLAS. Measured on an H200 (bench_kernels.py --gemv-only, 20
# projections to a graph), one row: the 0.6B architecture's o_proj (1024 x 2048) 3.6 us against cuBLAS's 12.7,
# its down_proj (1024 x 3072) 5.8 against 6.8, the 8B's down_proj per rank at TP=2 (4096 x 6144) 15.5 against
# 16.8; wider outputs (qkv, gate_up, LM head) and two or more rows were as fast or faster on cuBLAS.
GEMV_MAX_ROWS = 1
_GEMV_DTYPES = (torch.bfloat16, torch.float16)


def _divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """KV heads each rank holds: an equal share, or one (replicated) when there are more ranks than KV heads."""
    if tp_size <= num_kv_heads:
        return _divide(num_kv_heads, tp_size)
    if tp_size % num_kv_heads:
        raise ValueError(f"{num_kv_heads} KV heads cannot be replicated evenly over tensor-parallel size {tp_size}")
    return 1


def uses_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x W^T`` takes the GEMV kernel (see ``GEMV_MAX_ROWS``). float32 stays on cuBLAS."""
    return (x.is_cuda and x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS and 2 * weight.shape[0] <= weight.shape[1]
            and x.dtype in _GEMV_DTYPES and weight.dtype == x.dtype and x.stride(1) == 1 and weight.stride(1) == 1)


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the GEMV kernel where it applies."""
    if uses_gemv(x, weight) and (bias is None or bias.is_contiguous()):
        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def _frozen(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class LoRA:
    """A low-rank update added to a linear layer's output rows ``rows`` (None: all outputs): ``(x A^T) B^T *
    scaling``, computed in the adapter's dtype (``x`` cast to it, as PEFT does)."""

    def __init__(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, rows: slice | None = None):
        self.lora_a, self.lora_b, self.scaling, self.rows = lora_a, lora_b, scaling, rows

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x.to(self.lora_a.dtype), self.lora_a), self.lora_b) * self.scaling


def _with_loras(y: torch.Tensor, x: torch.Tensor, loras: list[LoRA]) -> torch.Tensor:
    """``y`` plus the updates, in PEFT's unmerged order: per HF layer (a row range), its output plus each adapter's
    update in turn (in the promoted dtype when adapters are kept in float32), cast back once. Bit for bit PEFT's."""
    start = 0
    while start < len(loras):
        rows = loras[start].rows
        stop = start
        while stop < len(loras) and loras[stop].rows == rows:
            stop += 1
        out = y if rows is None else y[..., rows]
        for lora in loras[start:stop]:
            out = out + lora.delta(x)
        if rows is None:
            y = out.to(y.dtype)
        else:
            y[..., rows] = out.to(y.dtype)
        start = stop
    return y


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with W's rows (outputs) split across ranks; the output stays sharded (no communication)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp_rank: int = 0, tp_size: int = 1,
                 group: ParallelGroup | None = None):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.in_features = in_features
        self.out_features = _divide(out_features, tp_size)
        self.weight = _frozen(self.out_features, in_features)
        self.bias = _frozen(self.out_features) if bias else None
        self.loras: list[LoRA] = []  # active PEFT adapters of the HF layers this one computes (TP=1)

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full ``[out_features * tp_size, ...]`` tensor (a view)."""
        size = full.shape[0] // self.tp_size
        return full[self.tp_rank * size : (self.tp_rank + 1) * size]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = project(x, self.weight, self.bias)
        return _with_loras(y, x, self.loras) if self.loras else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one GEMM (gate_proj and up_proj)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False, tp_rank: int = 0,
                 tp_size: int = 1, group: ParallelGroup | None = None):
        self.full_sizes = list(output_sizes)  # each part's size in the unsharded model
        self.output_sizes = [_divide(size, tp_size) for size in output_sizes]
        super().__init__(in_features, sum(output_sizes), bias, tp_rank, tp_size, group)

    def shard_part(self, index: int, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of part ``index`` of the unsharded model (a view)."""
        size = self.output_sizes[index]
        return full[self.tp_rank * size : (self.tp_rank + 1) * size]

    def fuse(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """One new tensor holding this rank's shard of each full part, stacked in order."""
        return torch.cat([self.shard_part(index, part) for index, part in enumerate(parts)])

    def part_slices(self) -> list[slice]:
        """Row ranges of each part inside the fused weight."""
        bounds = [0]
        for size in self.output_sizes:
            bounds.append(bounds[-1] + size)
        return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


class QKVParallelLinear(MergedColumnParallelLinear):
    """Fused q/k/v projection; ranks split heads, so each rank's slice is ``[q heads | k heads | v heads]``.

    With more ranks than KV heads, each KV head is replicated on ``tp_size / num_kv_heads`` consecutive ranks (the
    ranks whose query heads attend to it)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1, group: ParallelGroup | None = None):
        self.num_heads = _divide(num_heads, tp_size)
        self.num_kv_heads = kv_heads_per_rank(num_kv_heads, tp_size)
        self.head_dim = head_dim
        self.total_kv_heads = num_kv_heads
        q, kv = num_heads * head_dim, num_kv_heads * head_dim
        self.full_sizes = [q, kv, kv]
        self.output_sizes = [self.num_heads * head_dim, self.num_kv_heads * head_dim, self.num_kv_heads * head_dim]
        ColumnParallelLinear.__init__(self, hidden_size, sum(self.output_sizes) * tp_size, bias, tp_rank, tp_size,
                                      group)

    def shard_part(self, index: int, full: torch.Tensor) -> torch.Tensor:
        if index == 0 or self.tp_size <= self.total_kv_heads:
            return super().shard_part(index, full)
        head = self.tp_rank * self.total_kv_heads // self.tp_size
        return full[head * self.head_dim : (head + 1) * self.head_dim]


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with W's columns (inputs) split across ranks; partial sums are all-reduced over ``group``
    (None: a rank's shard held for sending, never run)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp_rank: int = 0, tp_size: int = 1,
                 group: ParallelGroup | None = None):
        super().__init__()
        self.tp_rank, self.tp_size, self.group = tp_rank, tp_size, group
        self.in_features = _divide(in_features, tp_size)
        self.out_features = out_features
        self.weight = _frozen(out_features, self.in_features)
        self.bias = _frozen(out_features) if bias else None
        self.loras: list[LoRA] = []  # active PEFT adapters of the HF layer this one computes (TP=1)

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's columns of a full weight (a view; bias is not sharded)."""
        size = full.shape[-1] // self.tp_size
        return full[..., self.tp_rank * size : (self.tp_rank + 1) * size]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias joins on one rank only, so the all-reduce adds it exactly once.
        y = project(x, self.weight, self.bias if self.tp_rank == 0 else None)
        if self.loras:
            y = _with_loras(y, x, self.loras)
        if self.tp_size > 1:
            self.group.all_reduce(y)
        return y
