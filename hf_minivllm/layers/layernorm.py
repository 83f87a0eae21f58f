"""RMSNorm with an optional fused residual add, in HF's exact order of operations (Llama's, or Gemma's)."""
from __future__ import annotations

import torch
from torch import nn

from hf_minivllm.kernels.rms_norm import fused_add_rms_norm, rms_norm as rms_norm_triton, rms_norm_torch


class RMSNorm(nn.Module):
    """``forward(x)`` normalises; ``forward(x, residual)`` first adds the residual and returns ``(normed, sum)``.

    The add happens in the model dtype before the fp32 upcast, as HF's ``hidden = residual + out`` does, so the
    sum carried to the next layer is bit-identical to HF's. On CUDA one Triton kernel does add and norm; leading
    dims are flattened, so per-head norms (``[T, heads, head_dim]``) take the same path.

    ``unit_offset`` (Gemma): the weight is an offset from 1, scaling happens in fp32 before the one rounding.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda:
            return self._forward_triton(x, residual)
        if residual is None:
            return rms_norm_torch(x, self.weight, self.eps, self.unit_offset)
        x = residual + x
        return rms_norm_torch(x, self.weight, self.eps, self.unit_offset), x

    def _forward_triton(self, x: torch.Tensor, residual: torch.Tensor | None):
        rows = x.reshape(-1, x.shape[-1])
        if residual is None:
            return rms_norm_triton(rows, self.weight, self.eps, self.unit_offset).view(x.shape)
        normed, summed = fused_add_rms_norm(rows, residual.reshape(rows.shape), self.weight, self.eps,
                                            self.unit_offset)
        return normed.view(x.shape), summed.view(x.shape)
