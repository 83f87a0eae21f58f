"""The gated MLP activation: ``silu(gate) * up`` over a fused ``[gate | up]`` projection output."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_minivllm.kernels.launch import launch


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """Reference: HF's ``act_fn(gate_proj(x)) * up_proj(x)`` on the fused ``[T, 2I]`` tensor."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_row_stride, out_row_stride, intermediate_size, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate_size
    gate = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_row_stride + intermediate_size + cols, mask=mask, other=0.0).to(tl.float32)
    # Round silu(gate) to the model dtype before the product, as torch's two separate ops do.
    activated = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, (activated * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton ``silu(x[:, :I]) * x[:, I:]`` for ``x [tokens, 2I]``."""
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(1) != 1:
        raise ValueError(f"silu_and_mul takes x [tokens, 2 * intermediate] contiguous in its last dim, got {tuple(x.shape)}")
    num_rows, intermediate_size = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_rows, intermediate_size, dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    block = min(triton.next_power_of_2(intermediate_size), 1024)
    launch(_silu_and_mul_kernel, (num_rows, triton.cdiv(intermediate_size, block)),
        x, out, x.stride(0), out.stride(0), intermediate_size, BLOCK=block, num_warps=4,
    )
    return out
