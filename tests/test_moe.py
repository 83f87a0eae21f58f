"""The sparse MoE block (Qwen3-MoE) against transformers' own modules: routing bit for bit, experts to rounding;
which layers are sparse; weights shared with the HF model; sizes tensor parallelism cannot split."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from hf_minivllm import LLM, SamplingParams
from hf_minivllm.layers.moe import SparseMoeBlock
from hf_minivllm.models.adapter import build_decoder, check_tensor_parallel


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_routes_exactly_as_hf_and_matches_its_experts(dtype, norm_topk_prob):
    model = tiny_model("qwen3_moe", dtype=dtype, norm_topk_prob=norm_topk_prob)
    hf_block = model.model.layers[0].mlp
    block = build_decoder(model).layers[0].mlp
    assert isinstance(block, SparseMoeBlock)
    x = torch.randn(37, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.inference_mode():
        _, hf_weights, hf_ids = hf_block.gate(x)
        weights, ids = block.gate(x)
        assert weights.dtype == hf_weights.dtype == dtype
        assert torch.equal(ids, hf_ids) and torch.equal(weights, hf_weights)
        tolerance = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(block(x), hf_block(x[None])[0], **tolerance)


def test_sparse_step_and_dense_layers_follow_hf_and_weights_are_shared():
    """decoder_sparse_step=2 with layer 3 dense by mlp_only_layers: only layer 1 is sparse. The router and stacked
    experts are HF's parameter objects, recorded for change detection."""
    model = tiny_model("qwen3_moe", num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3])
    decoder = build_decoder(model)
    assert [isinstance(layer.mlp, SparseMoeBlock) for layer in decoder.layers] == [False, True, False, False]
    assert decoder.config.moe.sparse_layers == (1,)
    hf_block, block = model.model.layers[1].mlp, decoder.layers[1].mlp
    assert block.gate.weight is hf_block.gate.weight
    assert block.experts.gate_up_proj is hf_block.experts.gate_up_proj
    assert block.experts.down_proj is hf_block.experts.down_proj
    sources = {(id(module), name) for module, name in decoder.weight_sources}
    for module, name in [(hf_block.gate, "weight"), (hf_block.experts, "gate_up_proj"),
                         (hf_block.experts, "down_proj")]:
        assert (id(module), name) in sources
    prompts = [[5, 9, 33, 2, 71, 18], [8, 8, 100, 4]]
    with LLM(model, num_kvcache_blocks=64, kvcache_block_size=4) as llm:
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        expected = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10,
                                  do_sample=False)
        assert output["token_ids"] == expected[0, len(prompt):].tolist()


def test_tensor_parallel_sizes_must_divide_the_expert_width():
    model = tiny_model("qwen3_moe", moe_intermediate_size=30)
    check_tensor_parallel(model, 2)
    with pytest.raises(ValueError, match="expert width 30"):
        check_tensor_parallel(model, 4)


def test_a_sliding_window_is_served_token_exact():
    """Qwen3-MoE masks every layer with ``sliding_window`` once ``use_sliding_window`` sets it: prompts longer than
    the window, greedy, equal to HF's generate."""
    model = tiny_model("qwen3_moe", use_sliding_window=True, sliding_window=8)
    assert model.config.sliding_window == 8
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 300, (n,), generator=generator).tolist() for n in (20, 9, 33)]
    expected = [model.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    with LLM(model, num_kvcache_blocks=64, kvcache_block_size=4) as llm:
        got = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert [out["token_ids"] for out in got] == expected