"""Rotary position embedding (HF's rotate-half convention) from the HF model's own frequencies.

Taking ``inv_freq`` and ``attention_scaling`` from the loaded HF rotary module makes every static rope_scaling
kind (default, linear, llama3, yarn, ...) exact without re-deriving it; kinds whose frequencies change with the
sequence length are rejected by the adapter.
"""
from __future__ import annotations

import torch
from torch import nn


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` on ``[T, heads, head_dim]`` with half-width ``cos``/``sin`` ``[T, 1, d/2]``.

    Written per half (``x1*c - x2*s``, ``x2*c + x1*s``), which rounds exactly like HF's full-width form.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RotaryEmbedding(nn.Module):
    """Holds a ``[max_positions, head_dim]`` cache ``[cos | sin]`` (half width each) in the model dtype."""

    def __init__(self, head_dim: int, inv_freq: torch.Tensor, attention_scaling: float, max_positions: int,
                 dtype: torch.dtype):
        super().__init__()
        if inv_freq.numel() * 2 != head_dim:
            raise ValueError(f"rotary inv_freq has {inv_freq.numel()} entries, expected head_dim/2 = {head_dim // 2}")
        self.head_dim = head_dim
        # Same fp32 arithmetic as HF's rotary forward, then the same cast to the model dtype.
        positions = torch.arange(max_positions, device=inv_freq.device, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq.float()[None, :]
        cache = torch.cat((freqs.cos() * attention_scaling, freqs.sin() * attention_scaling), dim=-1)
        self.cos_sin_cache = nn.Buffer(cache.to(dtype), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` ``[T, Hq*D]`` and ``k`` ``[T, Hk*D]`` (or already ``[T, H, D]``); shapes are preserved."""
        cos, sin = self.cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
        q_rot = apply_rotary(q.view(q.shape[0], -1, self.head_dim), cos, sin)
        k_rot = apply_rotary(k.view(k.shape[0], -1, self.head_dim), cos, sin)
        return q_rot.view(q.shape), k_rot.view(k.shape)
