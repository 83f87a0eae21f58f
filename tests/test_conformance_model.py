"""Model hygiene: everything besides generate keeps working on an accelerated model, in every dtype, and restore
undoes the patch (the pipeline hook included)."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, pipeline

import hf_minivllm
from conftest import SMALL_ENGINE, left_padded_batch, tiny_model

DTYPE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype", list(DTYPE_TOLERANCE), ids=str)
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_dtypes_served_with_hf_tokens_and_scores(family, dtype):
    model = tiny_model(family, dtype=dtype)
    oracle = copy.deepcopy(model)
    hf_minivllm.accelerate(model, **SMALL_ENGINE)
    ids, mask = left_padded_batch()
    settings = dict(max_new_tokens=10, do_sample=False, repetition_penalty=1.2, return_dict_in_generate=True, output_scores=True)
    got = model.generate(input_ids=ids, attention_mask=mask, **settings)
    expected = oracle.generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(got.sequences, expected.sequences)
    tolerance = DTYPE_TOLERANCE[dtype]
    assert all(torch.allclose(a, b, atol=tolerance, rtol=tolerance) for a, b in zip(got.scores, expected.scores))
    assert all(step.dtype == torch.float32 for step in got.scores), "HF's scores are float32 whatever the model dtype"
    assert model.dtype == dtype and model.device == oracle.device
    assert hf_minivllm.stats(model)["fallbacks"] == 0


def test_forward_config_and_save_pretrained_keep_working(tmp_path):
    model = tiny_model("qwen2")
    oracle = copy.deepcopy(model)
    config, generation_config = model.config, model.generation_config
    hf_minivllm.accelerate(model, **SMALL_ENGINE)
    ids = torch.randint(3, 300, (2, 7))
    assert torch.allclose(model(ids).logits, oracle(ids).logits, atol=1e-6)
    assert model.config is config and model.generation_config is generation_config and model.can_generate()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    saved, original = reloaded.state_dict(), oracle.state_dict()
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)


def test_restore_gives_back_hf_generate_and_pipeline(smollm2):
    model, tokenizer = smollm2
    oracle = copy.deepcopy(model)
    hf_minivllm.accelerate(model)
    hf_minivllm.accelerate(model)  # a second call is harmless
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompts = ["The capital of France is", "Once upon a time"]
    served = pipe(prompts, max_new_tokens=8, do_sample=False)
    hf_minivllm.restore(model)
    assert "generate" not in model.__dict__
    assert pipe(prompts, max_new_tokens=8, do_sample=False) == served
    plain = pipeline("text-generation", model=oracle, tokenizer=tokenizer)
    assert plain(prompts, max_new_tokens=8, do_sample=False) == served


@pytest.mark.gpu
def test_cuda_bf16_model_matches_hf():
    model = tiny_model("qwen3", dtype=torch.bfloat16).cuda()
    oracle = copy.deepcopy(model)
    hf_minivllm.accelerate(model, **SMALL_ENGINE)
    ids, mask = (t.cuda() for t in left_padded_batch())
    settings = dict(max_new_tokens=10, do_sample=False, no_repeat_ngram_size=2, return_dict_in_generate=True, output_logits=True)
    got = model.generate(input_ids=ids, attention_mask=mask, **settings)
    expected = oracle.generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(got.sequences, expected.sequences) and got.sequences.device.type == "cuda"
    assert all(torch.allclose(a, b, atol=5e-2, rtol=5e-2) for a, b in zip(got.logits, expected.logits))
