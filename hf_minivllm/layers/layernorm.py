"""RMSNorm with an optional fused residual add, in HF's exact order of operations."""
from __future__ import annotations

import torch
from torch import nn

from hf_minivllm.kernels.rms_norm import fused_add_rms_norm, rms_norm as rms_norm_triton


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm: normalise in fp32, cast back to the input dtype, then scale (token-exact with HF)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class RMSNorm(nn.Module):
    """``forward(x)`` normalises; ``forward(x, residual)`` first adds the residual and returns ``(normed, sum)``.

    The add happens in the model dtype before the fp32 upcast, as HF's ``hidden = residual + out`` does, so the
    sum carried to the next layer is bit-identical to HF's. On CUDA one Triton kernel does add and norm; leading
    dims are flattened, so per-head norms (``[T, heads, head_dim]``) take the same path.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda:
            return self._forward_triton(x, residual)
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        x = residual + x
        return rms_norm(x, self.weight, self.eps), x

    def _forward_triton(self, x: torch.Tensor, residual: torch.Tensor | None):
        rows = x.reshape(-1, x.shape[-1])
        if residual is None:
            return rms_norm_triton(rows, self.weight, self.eps).view(x.shape)
        normed, summed = fused_add_rms_norm(rows, residual.reshape(rows.shape), self.weight, self.eps)
        return normed.view(x.shape), summed.view(x.shape)
