"""Cascade attention's step planning: which decode steps share a prefix, and that they run (and agree) end to end.

The kernel itself is checked against the torch reference in ``test_kernels.py`` and, on a GPU, end to end in
``test_gpu_engine.py``. On the CPU the torch backend attends as usual, so these tests force the runner's choice and
check the plan the GPU would act on.
"""
import numpy as np
import pytest
import torch

from hf_minivllm import LLM, SamplingParams
from hf_minivllm.config import Config
from hf_minivllm.engine import model_runner
from hf_minivllm.engine.decode_tables import shared_prefix_blocks
from conftest import shared_prefix_prompts, tiny_model


def test_shared_prefix_blocks_counts_the_leading_blocks_every_row_holds():
    tables = np.array([[7, 3, 9, 1, 5], [7, 3, 9, 2, 6], [7, 3, 9, 1, 8]], dtype=np.int32)
    assert shared_prefix_blocks(tables, np.array([80, 80, 80]), 16) == 3
    # the shortest row's last token's block is its own: 40 tokens keep blocks 0-1 shared, block 2 holds token 39
    assert shared_prefix_blocks(tables, np.array([80, 40, 80]), 16) == 2
    assert shared_prefix_blocks(tables, np.array([80, 33, 80]), 16) == 2
    assert shared_prefix_blocks(tables, np.array([80, 32, 80]), 16) == 1
    tables[1, 1] = 4
    assert shared_prefix_blocks(tables, np.array([80, 80, 80]), 16) == 1
    tables[2, 0] = 0
    assert shared_prefix_blocks(tables, np.array([80, 80, 80]), 16) == 0
    assert shared_prefix_blocks(tables[:1], np.array([17]), 16) == 1  # one row: its full blocks
    assert shared_prefix_blocks(tables[:1], np.array([16]), 16) == 0


def test_cascade_attention_is_a_validated_boolean():
    with pytest.raises(ValueError, match="cascade_attention must be a boolean"):
        Config(cascade_attention="yes")


def test_decode_steps_over_a_shared_prefix_plan_a_cascade_and_take_it_to_the_forward_pass(monkeypatch):
    """Prompts sharing 48 tokens (prefix caching shares their pages): once enough of them decode together, the
    steps carry the shared length (whole blocks before every row's last token) to the eager pass that takes it.
    On CPU the torch backend then attends as usual, so the tokens equal cascade-off's by construction: this checks
    the planning and its path; the kernel is checked in test_kernels.py, the whole on a GPU in test_gpu_engine.py."""
    monkeypatch.setattr(model_runner, "CASCADE_MIN_SEQS", 4)
    monkeypatch.setattr(model_runner, "CASCADE_MIN_PREFIX_TOKENS", 16)
    model = tiny_model("qwen3")
    prompts = shared_prefix_prompts(6, 48)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine = dict(kvcache_block_size=8, max_num_seqs=8, max_model_len=128, num_kvcache_blocks=128)
    expected = [out["token_ids"] for out in LLM(model, cascade_attention=False, **engine).generate(
        prompts, params, use_tqdm=False)]

    llm = LLM(model, cascade_attention=True, **engine)
    runner = llm.engine.runner
    assert not runner._cascade  # the torch backend: off by itself
    runner._cascade = True
    shared, eager = [], []
    plan_decode, eager_decode = runner._plan_decode, runner.eager_decode_logits

    def spy_plan(batch, previous):
        plan = plan_decode(batch, previous)
        shared.append(plan.shared_prefix_len)
        return plan

    def spy_eager(inputs, shared_prefix_len=0):
        eager.append(shared_prefix_len)
        return eager_decode(inputs, shared_prefix_len)

    monkeypatch.setattr(runner, "_plan_decode", spy_plan)
    monkeypatch.setattr(runner, "eager_decode_logits", spy_eager)
    got = [out["token_ids"] for out in llm.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    assert 48 in shared and all(length in (0, 40, 48) for length in shared), shared
    assert [length for length in eager if length] == [length for length in shared if length]
