"""The one-row projection kernel (``hf_minivllm.kernels.gemv``) against ``F.linear``.

Without a GPU the kernel runs under Triton's interpreter (fp32/fp16: bf16 is unreliable there), switched on before
triton's first import (conftest); where something imported triton first, ``test_interpreter_tests_in_a_fresh_process``
reruns this file in a subprocess, as in ``tests/test_kernels.py``. GPU-marked tests check both models' shapes in bf16/fp16, replayed from a CUDA graph.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import import_kernel_module, run_under_interpreter
from kernel_variants import compile_for_hopper
from test_kernels import DEVICE, GPU_DTYPES, _assert_close_to_fp32_reference, _captured, _tolerance

# Each test records the kernel variants it launches under the interpreter; the last compiles them for a GPU.
pytestmark = pytest.mark.usefixtures("launched_kernel_variants")


@pytest.fixture(scope="module")
def kernels():
    """A namespace holding the kernel module, compiled on a GPU or interpreted on CPU."""
    return type("Kernels", (), {"gemv": import_kernel_module("gemv")})


def test_interpreter_tests_in_a_fresh_process():
    """Runs this file under the interpreter when this process cannot (see the module doc)."""
    run_under_interpreter(Path(__file__))


def _gemv_inputs(rows: int, out_features: int, in_features: int, dtype: torch.dtype, bias: bool,
                 device: str = DEVICE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(rows * 7919 + out_features + in_features)
    x = torch.randn(rows, in_features, generator=generator).to(dtype).to(device)
    weight = (torch.randn(out_features, in_features, generator=generator) / in_features**0.5).to(dtype).to(device)
    return x, weight, torch.randn(out_features, generator=generator).to(dtype).to(device) if bias else None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("out_features,in_features,bias", [(37, 100, True), (30, 96, False), (8, 1030, True)])
def test_gemv_matches_torch(kernels, dtype, rows, out_features, in_features, bias):
    """Odd sizes (a masked last tile of input features, rows below the tile's) against ``F.linear`` in the same
    dtype. Below 2,048 output features each program takes one (``BLOCK_N`` 1): their count only sizes the grid, one
    interpreted program per feature, so it stays small."""
    x, weight, b = _gemv_inputs(rows, out_features, in_features, dtype, bias)
    torch.testing.assert_close(kernels.gemv.gemv(x, weight, b), kernels.gemv.gemv_torch(x, weight, b),
                               **_tolerance(dtype))


def test_gemv_reads_a_strided_weight_and_rejects_bad_input(kernels):
    """A column slice of a wider matrix (a row-parallel shard is one) is read in place; misuse is a clear error."""
    x, wide, _ = _gemv_inputs(2, 24, 80, torch.float32, False)
    weight = wide[:, 16:56]
    torch.testing.assert_close(kernels.gemv.gemv(x[:, :40], weight), F.linear(x[:, :40], weight), **_tolerance(torch.float32))
    with pytest.raises(ValueError, match="rows <= 8"):
        kernels.gemv.gemv(torch.zeros(9, 40, device=DEVICE), weight)
    with pytest.raises(ValueError, match="weight"):
        kernels.gemv.gemv(x[:, :40], weight.t())
    with pytest.raises(ValueError, match="one dtype"):
        kernels.gemv.gemv(x[:, :40].half(), weight)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 4, 8])
def test_gpu_gemv_at_model_shapes_in_a_cuda_graph(kernels, dtype, rows):
    """The 0.6B and 8B architectures' projections (whole and halved for two ranks), replayed from a CUDA graph
    with new inputs, against an fp32 reference on the same rounded inputs."""
    for out_features, in_features in ((4096, 1024), (1024, 2048), (1024, 3072), (3072, 4096), (4096, 6144),
                                      (151936, 1024)):
        x, weight, bias = _gemv_inputs(rows, out_features, in_features, dtype, True, device="cuda")
        graph, out = _captured(lambda: kernels.gemv.gemv(x, weight, bias))
        x.copy_(torch.randn_like(x))
        graph.replay()
        _assert_close_to_fp32_reference(out, F.linear(x.float(), weight.float(), bias.float()), dtype)


def test_launched_variants_compile_for_a_hopper_gpu(launched_kernel_variants):
    """Last in this module: its launches' variants compile for sm_90 (the interpreter accepts what the compiler may
    not; see ``kernel_variants``)."""
    compile_for_hopper(launched_kernel_variants)
