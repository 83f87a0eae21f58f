"""Bad input fails before any work starts, with a message naming the argument, and the engine stays usable."""
import pytest
import torch

import hf_minivllm
from hf_minivllm import LLM, Config, SamplingParams
from conftest import tiny_model


@pytest.fixture(scope="module")
def llm():
    return LLM(tiny_model("qwen3"), num_kvcache_blocks=64, kvcache_block_size=4, max_model_len=128)


def assert_still_works(llm):
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0]["token_ids"]) == 3
    manager = llm.engine.scheduler.block_manager
    assert manager.num_free_blocks == manager.num_blocks and not llm.engine.has_unfinished()


@pytest.mark.parametrize(
    "prompts, params, message",
    [
        ([[]], SamplingParams(), "empty"),
        ([[1] * 128], SamplingParams(), "max_model_len"),
        ([[1] * 10, [1] * 200], SamplingParams(), "prompt 1 has 200 tokens"),
        ([[1, 2, 10_000]], SamplingParams(), r"token ids must be integers in \[0, 320\)"),
        ([[1, 2]], SamplingParams(max_tokens=100), None),  # fits: control case
        ([[1, 2]] * 2, [SamplingParams()], "2 prompts but 1 sampling params"),
    ],
)
def test_bad_requests_raise_before_work_and_engine_survives(llm, prompts, params, message):
    requests_before = hf_minivllm.stats(llm)["requests"]
    if message is None:
        llm.generate(prompts, params, use_tqdm=False)
    else:
        with pytest.raises(ValueError, match=message):
            llm.generate(prompts, params, use_tqdm=False)
        assert hf_minivllm.stats(llm)["requests"] == requests_before, "nothing may be queued when a request is bad"
    assert_still_works(llm)


def test_request_larger_than_the_whole_kv_cache_is_rejected():
    small = LLM(tiny_model("llama"), num_kvcache_blocks=4, kvcache_block_size=4, max_model_len=128)
    with pytest.raises(ValueError, match="whole cache holds 16"):
        small.generate([[1] * 10], SamplingParams(max_tokens=20), use_tqdm=False)
    assert_still_works(small)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_tokens=0), "max_tokens must be an integer > 0"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(temperature=-0.1), "temperature must be a number >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(seed="x"), "seed"),
        (dict(min_tokens=10, max_tokens=5), "min_tokens"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
    ],
)
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kvcache_block_size=12), "power of two"),
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
        (dict(attention_backend="magic"), "attention_backend"),
        (dict(num_kvcache_blocks=0), "num_kvcache_blocks"),
        (dict(tensor_parallel_size=2, kv_cache_resident=False), "kv_cache_resident=False"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Config(**kwargs)


def test_unknown_llm_argument_is_named():
    with pytest.raises(ValueError, match="not_an_option"):
        LLM(tiny_model("qwen2"), not_an_option=1)


def test_string_prompt_without_tokenizer_is_a_clear_error(llm):
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("hello", use_tqdm=False)
    assert_still_works(llm)


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(ValueError, match="(?i)qwen3.*llama|llama.*qwen3"):
        hf_minivllm.LLM(model)
    with pytest.warns(UserWarning, match="(?i)qwen3.*llama|llama.*qwen3"):
        hf_minivllm.accelerate(model)  # a drop-in never breaks the program: HF's generate stays
    assert "generate" not in model.__dict__


def test_generate_bad_attention_mask_shape_is_an_error():
    model = hf_minivllm.accelerate(tiny_model("qwen3"), num_kvcache_blocks=64, kvcache_block_size=4)
    ids = torch.randint(3, 300, (2, 5))
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(input_ids=ids, attention_mask=torch.ones(2, 4, dtype=torch.long), max_new_tokens=2)
