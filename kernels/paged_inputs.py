"""Input checks shared by the paged-attention kernels (one message for the same mistake in either kernel)."""
from __future__ import annotations

import torch


def kernels_take_head_dim(head_dim: int) -> bool:
    """Whether the Triton attention kernels take heads this wide: a power of two, at least 16 (their tiles' width)."""
    return head_dim >= 16 and not head_dim & (head_dim - 1)


def check_paged_attention_inputs(kernel: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor) -> None:
    """Raise ValueError unless the Triton ``kernel`` ("decode" or "prefill") can read these tensors."""
    head_dim = q.shape[-1]
    if not kernels_take_head_dim(head_dim):
        raise ValueError(f"the Triton {kernel} kernel needs a power-of-two head_dim >= 16, got {head_dim}")
    if q.stride(-1) != 1 or block_tables.stride(1) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("q must be contiguous along head_dim, block_tables along its rows, the caches entirely")
