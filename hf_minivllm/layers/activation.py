"""Gated activations for the fused gate_up projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hf_minivllm.kernels.activation import silu_and_mul


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` for ``x = [gate | up]`` along the last dim (HF's ``act(gate_proj(x)) * up_proj(x))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(nn.Module):
    """``gelu_tanh(gate) * up`` for ``x = [gate | up]`` (Gemma's ``gelu_pytorch_tanh``): torch's own tanh-approximate
    GELU on every device, the function HF calls, so the rounding is HF's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
