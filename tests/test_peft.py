"""PEFT LoRA models served by the engine: equal to PEFT's own forward with adapters on, off, switched, merged,
and after their weights change; what the engine cannot compute stays with PEFT/transformers."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

import hf_minivllm
from conftest import SMALL_ENGINE, left_padded_batch, tiny_model
from hf_minivllm import LLM, SamplingParams

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GREEDY = dict(max_new_tokens=10, do_sample=False)


def lora_model(family: str = "qwen3", dtype: torch.dtype = torch.float32, **lora_options):
    """A tiny random model with two random (non-zero) LoRA adapters, "first" active."""
    torch.manual_seed(1)
    options = {**dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False), **lora_options}
    model = get_peft_model(tiny_model(family, dtype=dtype), LoraConfig(**options), adapter_name="first")
    torch.manual_seed(2)
    model.add_adapter("second", LoraConfig(**{**options, "r": 2, "lora_alpha": 4}))
    with torch.no_grad():  # init_lora_weights=False draws small values; make the adapters change the answers
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(8.0)
    return model.eval()


def both(family: str = "qwen3", dtype: torch.dtype = torch.float32, **lora_options):
    oracle = lora_model(family, dtype, **lora_options)
    served = hf_minivllm.accelerate(copy.deepcopy(oracle), **SMALL_ENGINE)
    return oracle, served


def assert_stays_with_peft(model, reason: str) -> None:
    """``accelerate`` leaves ``model`` to PEFT's own generate: one warning, ``reason`` in the stats, PEFT's answers."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        served = hf_minivllm.accelerate(copy.deepcopy(model), **SMALL_ENGINE)
    assert len([w for w in caught if "hf-minivllm" in str(w.message)]) == 1
    assert reason in hf_minivllm.stats(served)["unsupported_reason"]
    assert_same(model, served)


def assert_same(oracle, served, ids=None, mask=None):
    if ids is None:
        ids, mask = left_padded_batch()
    expected = oracle.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    assert torch.equal(served.generate(input_ids=ids, attention_mask=mask, **GREEDY), expected)
    return expected


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_lora_model_is_served_and_token_exact(family):
    oracle, served = both(family)
    expected = assert_same(oracle, served)
    base = copy.deepcopy(oracle)
    with base.disable_adapter():
        ids, mask = left_padded_batch()
        assert not torch.equal(base.generate(input_ids=ids, attention_mask=mask, **GREEDY), expected), \
            "the adapter must change the answer, or this test proves nothing"
    stats = hf_minivllm.stats(served)
    assert stats["unsupported_reason"] is None and stats["fallbacks"] == 0 and stats["requests"] == 4


def test_disabling_switching_merging_and_unmerging_adapters_are_seen_by_the_next_call():
    oracle, served = both()
    with oracle.disable_adapter(), served.disable_adapter():
        assert_same(oracle, served)
    assert_same(oracle, served)
    for model in (oracle, served):
        model.set_adapter("second")
    assert_same(oracle, served)
    for model in (oracle, served):
        model.base_model.merge_adapter()
    assert_same(oracle, served)
    for model in (oracle, served):
        model.base_model.unmerge_adapter()
        model.set_adapter("first")
    assert_same(oracle, served)
    stats = hf_minivllm.stats(served)
    assert stats["fallbacks"] == 0 and stats["rebuilds"] >= 4


def test_trained_adapter_weights_are_used_by_the_next_call():
    oracle, served = both()
    assert_same(oracle, served)
    for model in (oracle, served):
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        optimizer = torch.optim.SGD(params, lr=0.5)
        ids, _ = left_padded_batch(lengths=(9, 9))
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.eval()
    assert_same(oracle, served)
    assert hf_minivllm.stats(served)["weight_updates"] >= 1


def test_llm_serves_a_peft_model():
    oracle = lora_model()
    llm = LLM(copy.deepcopy(oracle), **SMALL_ENGINE)
    prompts = [[5, 9, 33, 2, 71], [8, 8, 100, 4]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for prompt, output in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        expected = oracle.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8,
                                   do_sample=False)
        assert output["token_ids"] == expected[0, len(prompt):].tolist()


def test_dora_adapters_stay_with_peft_with_one_warning():
    assert_stays_with_peft(lora_model(use_dora=True), "DoRA")


def test_lora_dropout_is_not_applied_in_training_mode_as_in_every_rollout_engine():
    """A training loop generating with the model in train mode (TRL's rollouts) is served, without dropout: the
    answers are the eval-mode answers, not a random draw."""
    oracle, served = both(lora_dropout=0.3)
    served.train()
    assert_same(oracle, served)
    assert hf_minivllm.stats(served)["fallbacks"] == 0


def test_float32_adapters_on_a_bfloat16_model_compute_as_peft_does():
    """PEFT keeps adapters in float32 on a 16-bit model (autocast_adapter_dtype) and adds their updates in float32."""
    oracle, served = both(dtype=torch.bfloat16)
    lora_a = oracle.base_model.model.model.layers[0].self_attn.q_proj.lora_A["first"].weight
    assert lora_a.dtype == torch.float32 and oracle.base_model.model.dtype == torch.bfloat16
    assert_same(oracle, served)
    assert hf_minivllm.stats(served)["fallbacks"] == 0


def test_per_request_adapters_go_to_peft_and_the_next_call_is_served_again():
    oracle, served = both()
    ids, mask = left_padded_batch()
    names = ["first", "second", "first", "second"]
    expected = oracle.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **GREEDY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = served.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **GREEDY)
    assert torch.equal(got, expected)
    assert hf_minivllm.stats(served)["fallbacks"] == 1
    assert_same(oracle, served)
    assert hf_minivllm.stats(served)["fallbacks"] == 1


def test_other_peft_tuners_stay_with_peft():
    from peft import AdaLoraConfig

    model = get_peft_model(tiny_model("qwen3"), AdaLoraConfig(r=4, target_modules=TARGETS, total_step=10,
                                                              init_lora_weights=False)).eval()
    assert_stays_with_peft(model, "not a plain Linear")


@pytest.mark.gpu
def test_lora_on_cuda_with_graphs_token_exact_and_switching_seen():
    """On the GPU (Triton kernels, CUDA-graph decode): the active adapter's answer equals PEFT's, and switching
    adapters between calls is seen (the graphs are recaptured for the new weights)."""
    oracle = lora_model().cuda()
    served = hf_minivllm.accelerate(copy.deepcopy(oracle), max_num_seqs=8, max_model_len=256)
    assert hf_minivllm.stats(served)["unsupported_reason"] is None
    ids, mask = (tensor.cuda() for tensor in left_padded_batch())
    for adapter in ("first", "second"):
        oracle.set_adapter(adapter)
        served.set_adapter(adapter)
        expected = oracle.generate(input_ids=ids, attention_mask=mask, **GREEDY)
        assert torch.equal(served.generate(input_ids=ids, attention_mask=mask, **GREEDY), expected)
    assert hf_minivllm.stats(served)["fallbacks"] == 0


def test_lora_on_moe_experts_stays_with_peft_and_lora_on_attention_in_a_moe_model_is_served():
    """On a MoE model PEFT puts LoRA for gate/up/down_proj on the stacked expert weights (``target_parameters``):
    not served, one warning naming it, PEFT's own answers. LoRA on the attention of the same model is served
    token-exact."""
    model = lora_model("qwen3_moe")
    assert model.peft_config["first"].target_parameters, "PEFT must target the experts, or this proves nothing"
    assert_stays_with_peft(model, "PEFT adapters on MoE experts")
    oracle, served = both("qwen3_moe", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert_same(oracle, served)
    stats = hf_minivllm.stats(served)
    assert stats["unsupported_reason"] is None and stats["fallbacks"] == 0
