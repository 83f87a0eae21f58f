"""accelerate(model).generate and LLM.generate against an unpatched copy of the same model (the oracle)."""
import copy
import warnings

import pytest
import torch

import hf_minivllm
from hf_minivllm import LLM, SamplingParams
from conftest import FAMILIES, SMALL_ENGINE, left_padded_batch, tiny_model



def accelerated_and_oracle(family, **engine):
    model = tiny_model(family)
    oracle = copy.deepcopy(model)
    return hf_minivllm.accelerate(model, **(engine or SMALL_ENGINE)), oracle


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_batch_is_token_exact_and_served_by_engine(family):
    model, oracle = accelerated_and_oracle(family)
    ids, mask = left_padded_batch()
    expected = oracle.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    assert torch.equal(got, expected)
    stats = hf_minivllm.stats(model)
    assert stats["fallbacks"] == 0 and stats["requests"] == 4 and stats["generated_tokens"] == 4 * 16


@pytest.mark.parametrize("family", FAMILIES)
def test_llm_generate_greedy_matches_hf_per_prompt(family):
    model = tiny_model(family)
    oracle = copy.deepcopy(model)
    llm = LLM(model, **SMALL_ENGINE)
    ids, mask = left_padded_batch(seed=2)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        expected = oracle.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, min_new_tokens=10)
        assert output["token_ids"] == expected[0, len(prompt) :].tolist()
    assert hf_minivllm.stats(llm)["generated_tokens"] == 40


def test_smollm2_chat_batch_is_token_exact(smollm2):
    model, tokenizer = smollm2
    oracle = copy.deepcopy(model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    questions = ["What is the capital of France?", "Name a primary colour.", "Write one word that rhymes with cat."]
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    expected = oracle.generate(**batch, max_new_tokens=24, do_sample=False)
    hf_minivllm.accelerate(model)
    got = model.generate(**batch, max_new_tokens=24, do_sample=False)
    assert torch.equal(got, expected)
    assert "Paris" in tokenizer.decode(got[0, batch["input_ids"].shape[1] :])
    assert hf_minivllm.stats(model)["fallbacks"] == 0


def test_eos_list_pad_id_and_max_length_contract():
    model, oracle = accelerated_and_oracle("qwen2")
    ids, mask = left_padded_batch(seed=3)
    free_run = oracle.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    generated = free_run[:, ids.shape[1] :]
    eos = sorted({int(generated[0, 2]), int(generated[2, 5])})  # tokens that do occur, so some rows stop early
    settings = dict(eos_token_id=eos, pad_token_id=7, max_length=ids.shape[1] + 12, do_sample=False)
    expected = oracle.generate(input_ids=ids, attention_mask=mask, **settings)
    got = model.generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(got, expected)
    assert (got[:, ids.shape[1] :] == 7).any(), "some row should have finished early and been padded"
    assert hf_minivllm.stats(model)["fallbacks"] == 0


def test_min_new_tokens_suppresses_eos():
    model, oracle = accelerated_and_oracle("llama")
    ids, mask = left_padded_batch(seed=4)
    first = oracle.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False)
    eos = int(first[0, -1])  # row 0 would stop at once
    settings = dict(eos_token_id=eos, pad_token_id=0, max_new_tokens=8, min_new_tokens=5, do_sample=False)
    expected = oracle.generate(input_ids=ids, attention_mask=mask, **settings)
    got = model.generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(got, expected)
    assert got.shape[1] >= ids.shape[1] + 5


def test_sampling_rows_grouped_reproducible_and_served():
    model, _ = accelerated_and_oracle("qwen3")
    ids, mask = left_padded_batch(seed=5, lengths=(6, 9))
    settings = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, num_return_sequences=3, max_new_tokens=8)
    torch.manual_seed(0)
    first = model.generate(input_ids=ids, attention_mask=mask, **settings)
    torch.manual_seed(0)
    second = model.generate(input_ids=ids, attention_mask=mask, **settings)
    assert first.shape == (6, ids.shape[1] + 8)
    assert torch.equal(first, second)
    assert torch.equal(first[:3, : ids.shape[1]], ids[0].expand(3, -1))  # rows of one prompt are adjacent
    assert torch.equal(first[3:, : ids.shape[1]], ids[1].expand(3, -1))
    assert len({tuple(row) for row in first[:, ids.shape[1] :].tolist()}) > 1
    assert hf_minivllm.stats(model)["fallbacks"] == 0


def test_generation_config_object_and_kwargs_precedence():
    from transformers import GenerationConfig

    model, oracle = accelerated_and_oracle("mistral")
    ids, mask = left_padded_batch(seed=6)
    config = GenerationConfig(max_new_tokens=5, do_sample=False, pad_token_id=0)
    expected = oracle.generate(input_ids=ids, attention_mask=mask, generation_config=config, max_new_tokens=9)
    got = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, max_new_tokens=9)
    assert torch.equal(got, expected) and got.shape[1] == ids.shape[1] + 9


def test_unsupported_setting_falls_back_once_with_warning_and_hf_result():
    model, oracle = accelerated_and_oracle("llama")
    ids, mask = left_padded_batch(seed=7)
    settings = dict(num_beams=2, max_new_tokens=5, do_sample=False)
    expected = oracle.generate(input_ids=ids, attention_mask=mask, **settings)
    with pytest.warns(UserWarning, match="num_beams"):
        got = model.generate(input_ids=ids, attention_mask=mask, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(got, expected)
    stats = hf_minivllm.stats(model)
    assert stats["fallbacks"] == 2 and stats["generated_tokens"] == 0
    assert any("num_beams" in reason for reason in stats["fallback_reasons"])


def test_unknown_kwarg_is_an_error_like_hf():
    model, _ = accelerated_and_oracle("qwen2")
    ids, mask = left_padded_batch()
    with pytest.raises(ValueError, match="not_a_setting"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, not_a_setting=1)


def test_preemption_gives_the_same_greedy_outputs_and_frees_every_block():
    model = tiny_model("qwen3")
    ample = LLM(copy.deepcopy(model), num_kvcache_blocks=256, kvcache_block_size=4)
    tight = LLM(model, num_kvcache_blocks=14, kvcache_block_size=4)
    generator = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, 320, (n,), generator=generator).tolist() for n in (9, 14, 6, 11, 8, 12)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    expected = ample.generate(prompts, params, use_tqdm=False)
    got = tight.generate(prompts, params, use_tqdm=False)
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in expected]
    assert hf_minivllm.stats(tight)["preemptions"] > 0
    manager = tight.engine.scheduler.block_manager
    assert manager.num_free_blocks == manager.num_blocks
    assert not any(manager.ref_counts)


def test_shared_prefix_hits_the_cache_with_identical_outputs():
    model = tiny_model("llama")
    cached = LLM(copy.deepcopy(model), num_kvcache_blocks=256, kvcache_block_size=4)
    uncached = LLM(model, num_kvcache_blocks=256, kvcache_block_size=4, enable_prefix_caching=False)
    generator = torch.Generator().manual_seed(9)
    prefix = torch.randint(3, 320, (18,), generator=generator).tolist()
    prompts = [prefix + torch.randint(3, 320, (n,), generator=generator).tolist() for n in (3, 5, 1)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    first = cached.generate(prompts, params, use_tqdm=False)
    second = cached.generate(prompts, params, use_tqdm=False)  # now the whole prompts are cached
    reference = uncached.generate(prompts, params, use_tqdm=False)
    assert [o["token_ids"] for o in first] == [o["token_ids"] for o in reference]
    assert [o["token_ids"] for o in second] == [o["token_ids"] for o in reference]
    assert hf_minivllm.stats(cached)["prefix_cache_hit_tokens"] >= 2 * 16
    assert hf_minivllm.stats(uncached)["prefix_cache_hit_tokens"] == 0
    manager = cached.engine.scheduler.block_manager
    assert manager.num_free_blocks == manager.num_blocks


def test_chunked_prefill_matches_one_shot_prefill():
    model = tiny_model("qwen2")
    one_shot = LLM(copy.deepcopy(model), num_kvcache_blocks=256, kvcache_block_size=4, max_model_len=64)
    chunked = LLM(model, num_kvcache_blocks=256, kvcache_block_size=4, max_model_len=64)
    chunked.engine.scheduler.max_num_batched_tokens = 5  # force prompts through in 5-token chunks
    generator = torch.Generator().manual_seed(10)
    prompts = [torch.randint(3, 320, (n,), generator=generator).tolist() for n in (13, 4, 9)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = one_shot.generate(prompts, params, use_tqdm=False)
    assert chunked.generate(prompts, params, use_tqdm=False) == expected
    assert hf_minivllm.stats(chunked)["steps"] > hf_minivllm.stats(one_shot)["steps"]


def test_string_prompts_and_text_output(smollm2):
    model, tokenizer = smollm2
    llm = LLM(model, tokenizer=tokenizer)
    outputs = llm.generate(["The capital of France is", [1, 2, 3]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=True)
    assert set(outputs[0]) == {"text", "token_ids"} and len(outputs) == 2
    assert outputs[0]["text"] == tokenizer.decode(outputs[0]["token_ids"], skip_special_tokens=True)


def test_chunked_prefill_after_a_cached_prefix_matches():
    """Chunks of a prompt whose head is in the prefix cache start after the cached part (positions and slots)."""
    model = tiny_model("llama")
    reference = LLM(copy.deepcopy(model), num_kvcache_blocks=256, kvcache_block_size=4, enable_prefix_caching=False)
    chunked = LLM(model, num_kvcache_blocks=256, kvcache_block_size=4)
    generator = torch.Generator().manual_seed(11)
    prefix = torch.randint(3, 320, (16,), generator=generator).tolist()
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    chunked.generate([prefix + [5]], params, use_tqdm=False)  # puts the prefix in the cache
    chunked.engine.scheduler.max_num_batched_tokens = 3
    prompts = [prefix + torch.randint(3, 320, (n,), generator=generator).tolist() for n in (9, 2)]
    expected = reference.generate(prompts, params, use_tqdm=False)
    assert chunked.generate(prompts, params, use_tqdm=False) == expected
    assert hf_minivllm.stats(chunked)["prefix_cache_hit_tokens"] >= 2 * 16


def test_min_tokens_applies_per_request_in_a_mixed_batch():
    llm = LLM(tiny_model("qwen2"), **SMALL_ENGINE)
    prompt = [17, 45, 99, 3, 250]
    first = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0]["token_ids"][0]
    held = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[first], min_tokens=3)
    free = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[first])
    outputs = llm.generate([prompt, prompt, [5, 6]], [held, free, free], use_tqdm=False)
    assert outputs[1]["token_ids"] == [first], "without min_tokens the stop token ends the request at once"
    assert len(outputs[0]["token_ids"]) >= 3 and first not in outputs[0]["token_ids"][:3]
