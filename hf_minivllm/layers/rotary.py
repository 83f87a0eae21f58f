"""Rotary position embedding (HF's rotate-half convention) from the HF model's own frequencies.

Taking ``inv_freq`` and ``attention_scaling`` from the loaded HF rotary module makes every static rope_scaling
kind (default, linear, llama3, yarn, ...) exact without re-deriving it. LongRoPE (Phi-3) switches between two
tables by sequence length: both are cached, and the runner picks a token's table through the position it passes
(see ``RotaryEmbedding``). Dynamic kinds are rejected by the adapter.

On CUDA (head_dim a multiple of 8 from 16 to 256, the Triton attention kernels' rule) one Triton launch rotates q and
k in place, after Qwen3's per-head q/k RMSNorm when given, instead of a dozen small torch kernels per layer
(``hf_minivllm.kernels.rotary``, bit-identical rotation), and writes the keys and values to the paged KV cache when
the attention layer hands it that write; elsewhere the torch path below runs.
"""
from __future__ import annotations

import torch
from torch import nn

from hf_minivllm.kernels.kv_cache import KVCacheWrite
from hf_minivllm.kernels.paged_inputs import kernels_take_head_dim
from hf_minivllm.kernels.rotary import apply_rotary_inplace, qk_norm_rotary_inplace
from hf_minivllm.layers.layernorm import RMSNorm


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` on ``[T, heads, head_dim]`` with half-width ``cos``/``sin`` ``[T, 1, d/2]``.

    Written per half (``x1*c - x2*s``, ``x2*c + x1*s``), which rounds exactly like HF's full-width form.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _cos_sin(inv_freq: torch.Tensor, attention_scaling: float, max_positions: int) -> torch.Tensor:
    """``[max_positions, head_dim]`` ``[cos | sin]`` in float32, computed as HF's rotary forward computes it."""
    positions = torch.arange(max_positions, device=inv_freq.device, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq.float()[None, :]
    return torch.cat((freqs.cos() * attention_scaling, freqs.sin() * attention_scaling), dim=-1)


class RotaryEmbedding(nn.Module):
    """Holds a ``[max_positions, head_dim]`` cache ``[cos | sin]`` (half width each) in the model dtype.

    With ``long_inv_freq`` (LongRoPE) the cache holds a second table of ``max_positions`` rows after the first:
    position ``p`` rotates with the long frequencies when it is given as ``p + long_offset``.
    """

    def __init__(self, head_dim: int, inv_freq: torch.Tensor, attention_scaling: float, max_positions: int,
                 dtype: torch.dtype, long_inv_freq: torch.Tensor | None = None):
        super().__init__()
        for name, table in (("inv_freq", inv_freq), ("long_inv_freq", long_inv_freq)):
            if table is not None and table.numel() * 2 != head_dim:
                raise ValueError(f"rotary {name} has {table.numel()} entries, expected head_dim/2 = {head_dim // 2}")
        self.head_dim = head_dim
        self.kernel_fits = kernels_take_head_dim(head_dim)
        tables = [inv_freq] if long_inv_freq is None else [inv_freq, long_inv_freq]
        self.long_offset = max_positions if long_inv_freq is not None else 0
        cache = torch.cat([_cos_sin(table, attention_scaling, max_positions) for table in tables])
        self.cos_sin_cache = nn.Buffer(cache.to(dtype), persistent=False)

    def uses_kernel(self, q: torch.Tensor) -> bool:
        """Whether ``forward`` runs the Triton kernel: on CUDA, for the heads the Triton attention kernels take
        (``kernels_take_head_dim``; the same launch can then write their cache)."""
        return q.is_cuda and self.kernel_fits

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_norm: RMSNorm | None = None,
                k_norm: RMSNorm | None = None, v: torch.Tensor | None = None,
                write: KVCacheWrite | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` ``[T, Hq*D]`` and ``k`` ``[T, Hk*D]`` (or already ``[T, H, D]``); shapes are preserved.

        ``q_norm``/``k_norm`` (Qwen3, Gemma 3; one shared eps) normalise each head first. On the CUDA kernel path ``q`` and
        ``k`` themselves are overwritten and returned; the torch path returns new tensors. ``v`` and ``write`` (the
        kernel path only, see ``uses_kernel``) also write the rotated keys and the values to the paged cache.
        """
        if self.uses_kernel(q):
            if q_norm is not None and q_norm.unit_offset:  # Gemma 3's norms: the fused kernel computes Llama's
                q = q_norm(q.view(q.shape[0], -1, self.head_dim)).view(q.shape)
                k = k_norm(k.view(k.shape[0], -1, self.head_dim)).view(k.shape)
                q_norm = k_norm = None
            if q_norm is None:
                apply_rotary_inplace(q, k, positions, self.cos_sin_cache, v=v, write=write)
            else:
                qk_norm_rotary_inplace(q, k, q_norm.weight, k_norm.weight, q_norm.eps, positions, self.cos_sin_cache,
                                       v=v, write=write)
            return q, k
        if write is not None:
            raise ValueError("only the rotary kernel writes the KV cache (see RotaryEmbedding.uses_kernel)")
        q_heads = q.view(q.shape[0], -1, self.head_dim)
        k_heads = k.view(k.shape[0], -1, self.head_dim)
        if q_norm is not None:
            q_heads, k_heads = q_norm(q_heads), k_norm(k_heads)
        cos, sin = self.cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
        return apply_rotary(q_heads, cos, sin).view(q.shape), apply_rotary(k_heads, cos, sin).view(k.shape)
