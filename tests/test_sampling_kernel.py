"""The one-pass Gumbel-max sampling kernel (``hf_minivllm.kernels.sampling``): a sampler of softmax(logits / T),
argmax at T = 0, never a masked token, repeatable from its seed; its torch reference against the exact softmax.

Without a GPU the kernel runs under Triton's interpreter, switched on before triton's first import (see
``tests/test_kernels.py``); otherwise ``test_interpreter_tests_in_a_fresh_process`` reruns this file in a
subprocess. The GPU test samples at W1's shape (256 rows of Qwen3's 151,936-token vocabulary).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import import_kernel_module, run_under_interpreter
from kernel_variants import compile_for_hopper

# Each test records the kernel variants it launches under the interpreter; the last compiles them for a GPU.
pytestmark = pytest.mark.usefixtures("launched_kernel_variants")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(scope="module")
def sampling():
    return import_kernel_module("sampling")


def test_interpreter_tests_in_a_fresh_process():
    run_under_interpreter(Path(__file__))


def seed(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


def empirical(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens.cpu(), minlength=vocab).float() / len(tokens)


def test_draws_follow_softmax_over_temperature(sampling):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5, float("-inf"), 0.2], device=DEVICE)
    # Each row is one program, about 60 ms under the interpreter; the tolerance is about 3 standard errors (a kernel
    # ignoring the temperature is off by 0.23).
    rows, tolerance = (20_000, 0.015) if CUDA else (150, 0.12)
    temperature = 0.5
    tokens = sampling.gumbel_max_sample(logits.expand(rows, -1).contiguous(),
                                        torch.full((rows,), temperature, device=DEVICE), seed(7))
    expected = torch.softmax(logits.cpu() / temperature, dim=-1)
    assert (empirical(tokens, 8) - expected).abs().max() < tolerance
    assert not (tokens == 6).any(), "a -inf logit is never sampled"


def test_draws_follow_softmax_across_quarters_and_blocks(sampling):
    """The likely tokens sit at one lane's column in each quarter of the first 4096-column block and of the second
    block (each lane keeps its own best across steps), and at another lane: a uniform shared between quarters, or
    a lane that forgets a step, skews the frequencies."""
    vocab = 5000
    likely = torch.tensor([7, 1031, 2055, 3079, 4103, 4500])
    logits = torch.full((vocab,), -30.0)
    logits[likely] = torch.tensor([1.0, 0.2, 0.8, 0.5, 0.0, 1.2])
    rows = 20_000 if CUDA else 150  # each row is a program, about 120 ms under the interpreter
    tokens = sampling.gumbel_max_sample(logits.to(DEVICE).expand(rows, -1).contiguous(),
                                        torch.full((rows,), 0.7, device=DEVICE), seed(21))
    expected = torch.softmax(logits / 0.7, -1)[likely]
    # About 3 standard errors; a shared uniform or a forgotten step takes a token's 0.18 or 0.32 to nothing.
    assert (empirical(tokens, vocab)[likely] - expected).abs().max() < (0.01 if CUDA else 0.115)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_zero_temperature_rows_take_the_argmax_across_blocks(sampling, dtype):
    generator = torch.Generator().manual_seed(0)
    vocab = 5000  # more than one 4096-wide block per row
    logits = torch.randn(6, vocab, generator=generator).to(DEVICE, dtype)
    logits[1, 4500] = 50.0
    logits[4, 3] = 50.0
    temperatures = torch.tensor([0.0, 0.0, 1.0, 0.5, 0.0, 0.0], device=DEVICE)
    tokens = sampling.gumbel_max_sample(logits, temperatures, seed(3))
    greedy = temperatures == 0
    assert torch.equal(tokens[greedy], logits.argmax(-1)[greedy])
    assert tokens[1] == 4500 and tokens[4] == 3
    assert ((tokens >= 0) & (tokens < vocab)).all()


@pytest.mark.parametrize("vocab", [1, 3, 5, 4100])
def test_zero_temperature_ties_take_the_first_column(sampling, vocab):
    """Ties between lanes (columns 9 and 1025 are lanes 9 and 1 of a 4096-column block) and a flat row take the
    first column, as torch's argmax does, at sizes below one quarter of a block, and above a block."""
    logits = torch.zeros(3, vocab, device=DEVICE)
    if vocab > 1025:
        logits[1, 9] = logits[1, 1025] = 2.0
        logits[2, 1025] = logits[2, 4099] = 2.0
    else:
        logits[1, -1] = logits[2, 0] = 2.0
    tokens = sampling.gumbel_max_sample(logits, torch.zeros(3, device=DEVICE), seed(1))
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_repeatable_from_the_seed(sampling):
    logits = torch.zeros(32, 16, device=DEVICE)
    temperatures = torch.ones(32, device=DEVICE)
    first = sampling.gumbel_max_sample(logits, temperatures, seed(11))
    assert torch.equal(first, sampling.gumbel_max_sample(logits, temperatures, seed(11)))
    assert not torch.equal(first, sampling.gumbel_max_sample(logits, temperatures, seed(12)))
    assert len(set(first.tolist())) > 4, "uniform logits spread over the vocabulary"


def test_bad_arguments_are_rejected(sampling):
    with pytest.raises(ValueError, match="temperatures"):
        sampling.gumbel_max_sample(torch.zeros(2, 4, device=DEVICE), torch.ones(3, device=DEVICE), seed(0))
    with pytest.raises(ValueError, match="logits"):
        sampling.gumbel_max_sample(torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE), seed(0))


def test_torch_reference_follows_softmax():
    from hf_minivllm.kernels.sampling import gumbel_max_sample_torch

    generator = torch.Generator().manual_seed(1)
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0])
    rows = 4000
    uniforms = torch.rand(rows, 4, generator=generator).clamp_min(1e-12)
    temperatures = torch.full((rows,), 1.3)
    temperatures[:10] = 0
    tokens = gumbel_max_sample_torch(logits.expand(rows, -1), temperatures, uniforms)
    assert (tokens[:10] == 3).all()
    assert (empirical(tokens[10:], 4) - torch.softmax(logits / 1.3, -1)).abs().max() < 0.03


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_w1_shape_on_cuda(sampling):
    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(256, 151936, device="cuda", generator=generator).bfloat16()  # read as the model wrote it
    temperatures = torch.full((256,), 0.6, device="cuda")
    temperatures[::7] = 0
    logits[5, 151935] = 100.0
    tokens = sampling.gumbel_max_sample(logits, temperatures, seed(5))
    greedy = temperatures == 0
    assert torch.equal(tokens[greedy], logits.argmax(-1)[greedy])
    assert tokens[5] == 151935
    small = torch.tensor([0.5, 1.5, -0.3, 0.9], device="cuda")
    draws = sampling.gumbel_max_sample(small.expand(200_000, -1).contiguous(), torch.full((200_000,), 0.6, device="cuda"),
                                       seed(9))
    assert (empirical(draws, 4) - torch.softmax(small.cpu() / 0.6, -1)).abs().max() < 0.01


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_engine_sampler_uses_the_kernel_and_keeps_suppressed_tokens_out():
    from hf_minivllm.layers.sampler import SamplingTensors, sample

    logits = torch.zeros(512, 1000, device="cuda")
    logits[:, :10] = float("-inf")  # what min_tokens suppression leaves behind
    temperatures = torch.full((512,), 0.7, device="cuda")
    temperatures[0] = 0
    params = SamplingTensors(temperatures=temperatures, top_ks=None, top_ps=None, min_ps=None, all_greedy=False,
                             any_greedy=True, use_top_k=False, use_top_p=False, use_min_p=False)
    tokens = sample(logits, params)
    assert (tokens >= 10).all() and tokens[0] == 10 and len(set(tokens.tolist())) > 100


def test_sampled_rows_without_a_distribution_come_back_marked(sampling):
    """NaN or +inf among a sampled row's logits (in either 4,096-column block), or nothing finite: NO_DISTRIBUTION,
    as the torch reference gives; a greedy row keeps its argmax (0 when nothing is finite)."""
    vocab = 5000
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(8))
    logits[0, 4500] = float("nan")
    logits[1, 9] = float("inf")
    logits[2] = float("-inf")
    logits[4, 4500] = float("nan")
    logits[5] = float("-inf")
    temperatures = torch.tensor([0.8, 0.8, 0.8, 0.8, 0.0, 0.0])
    tokens = sampling.gumbel_max_sample(logits.to(DEVICE), temperatures.to(DEVICE), seed(4)).cpu()
    assert tokens[:3].tolist() == [sampling.NO_DISTRIBUTION] * 3
    assert 0 <= tokens[3] < vocab
    assert tokens[4] == logits[4].nan_to_num(nan=float("-inf")).argmax() and tokens[5] == 0
    reference = sampling.gumbel_max_sample_torch(logits, temperatures, torch.rand(6, vocab))
    assert reference[:3].tolist() == [sampling.NO_DISTRIBUTION] * 3


def test_launched_variants_compile_for_a_hopper_gpu(launched_kernel_variants):
    """Last in this module: its launches' variants compile for sm_90 (the interpreter accepts what the compiler may
    not; see ``kernel_variants``)."""
    compile_for_hopper(launched_kernel_variants)
