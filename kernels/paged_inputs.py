"""Input checks shared by the paged-attention kernels (one message for the same mistake in either kernel)."""
from __future__ import annotations

import torch

# The head sizes the Triton attention kernels take, as vLLM's and flash-attention's Triton kernels take them: multiples
# of 8 (a head's row is whole 16-byte vectors in 16-bit dtypes, so the padded tiles' masked loads stay vectorised)
# from 16 to 256 (the widest head the kernels' tile sizes were chosen for).
MIN_HEAD_DIM, MAX_HEAD_DIM, HEAD_DIM_MULTIPLE = 16, 256, 8
HEAD_DIM_RULE = f"a head_dim that is a multiple of {HEAD_DIM_MULTIPLE} from {MIN_HEAD_DIM} to {MAX_HEAD_DIM}"


def kernels_take_head_dim(head_dim: int) -> bool:
    """Whether the Triton attention kernels take heads this wide (``HEAD_DIM_RULE``; the rotary kernel, which writes
    their cache, takes the same). Their tiles span ``padded_head_dim(head_dim)`` lanes; the lanes past the head read
    as 0 and are never stored."""
    return MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM and head_dim % HEAD_DIM_MULTIPLE == 0


def padded_head_dim(head_dim: int) -> int:
    """The kernels' tile width along the head: the next power of two (the head itself when it is one)."""
    return 1 << (head_dim - 1).bit_length()


def check_paged_attention_inputs(kernel: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor) -> None:
    """Raise ValueError unless the Triton ``kernel`` ("decode" or "prefill") can read these tensors."""
    head_dim = q.shape[-1]
    if not kernels_take_head_dim(head_dim):
        raise ValueError(f"the Triton {kernel} kernel needs {HEAD_DIM_RULE}, got head_dim {head_dim}")
    if q.stride(-1) != 1 or block_tables.stride(1) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("q must be contiguous along head_dim, block_tables along its rows, the caches entirely")
