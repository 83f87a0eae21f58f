"""Gated activation for the fused gate_up projection."""
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
