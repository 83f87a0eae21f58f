"""A model the engine cannot serve keeps working: ``accelerate`` leaves it to transformers with one warning."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import hf_minivllm
from conftest import ScaledLayer, left_padded_batch, tiny_config, tiny_model
from hf_minivllm import LLM


def _accelerate_warning_once(model, match: str):
    """accelerate(model), checking it warned exactly once (naming ``match``); later generate calls warn nothing."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = hf_minivllm.accelerate(model)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and match in messages[0], messages
    assert result is model and "generate" not in model.__dict__
    assert match in hf_minivllm.stats(model)["unsupported_reason"]
    return result


def _same_as_hf(model, oracle, **inputs):
    settings = dict(max_new_tokens=6, do_sample=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            got = model.generate(**inputs, **settings)
    assert not [w for w in caught if "hf-minivllm" in str(w.message)]
    with torch.no_grad():
        expected = oracle.generate(**inputs, **settings)
    assert torch.equal(got, expected)


def test_another_architecture_keeps_hf_generate():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).eval()
    oracle = copy.deepcopy(model)
    _accelerate_warning_once(model, "GPT2LMHeadModel")
    _same_as_hf(model, oracle, input_ids=torch.randint(0, 100, (2, 5)), attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="supported: .*Qwen3ForCausalLM"):
        LLM(model)


def test_encoder_decoder_keeps_hf_generate():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config).eval()
    oracle = copy.deepcopy(model)
    _accelerate_warning_once(model, "T5ForConditionalGeneration")
    _same_as_hf(model, oracle, input_ids=torch.randint(1, 64, (2, 7)))


def test_gemma3_multimodal_keeps_hf_generate():
    """Gemma3ForConditionalGeneration (vision tower + Gemma 3 text model) is not served: text-only generate stays
    HF's, with one warning."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=tiny_config("gemma3").to_dict(), vision_config=vision.to_dict(),
                          mm_tokens_per_image=4, image_token_index=300, boi_token_index=301, eoi_token_index=302)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    oracle = copy.deepcopy(model)
    _accelerate_warning_once(model, "Gemma3ForConditionalGeneration")
    ids, mask = left_padded_batch()
    _same_as_hf(model, oracle, input_ids=ids, attention_mask=mask)


def test_quantized_model_keeps_hf_generate():
    """A stand-in for a bitsandbytes model: the quantization config is what marks it."""
    model = tiny_model("llama")
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    oracle = copy.deepcopy(model)
    _accelerate_warning_once(model, "bitsandbytes")
    ids, mask = left_padded_batch()
    _same_as_hf(model, oracle, input_ids=ids, attention_mask=mask)


def test_wrapped_layer_and_integer_weights_keep_hf_generate():
    model = tiny_model("qwen3")
    model.model.layers[0].mlp.down_proj = ScaledLayer(model.model.layers[0].mlp.down_proj, 0.5)
    oracle = copy.deepcopy(model)
    _accelerate_warning_once(model, "model.layers.0.mlp.down_proj is a Scaled")
    ids, mask = left_padded_batch()
    _same_as_hf(model, oracle, input_ids=ids, attention_mask=mask)

    int8 = tiny_model("llama")
    embedding = int8.model.embed_tokens
    embedding.weight = torch.nn.Parameter(embedding.weight.data.to(torch.int8), requires_grad=False)
    with pytest.warns(UserWarning, match="torch.int8"):
        hf_minivllm.accelerate(int8)
    assert "torch.int8" in hf_minivllm.stats(int8)["unsupported_reason"]


def test_restore_and_accelerate_again_once_the_model_is_servable():
    model = tiny_model("llama")
    model.config.quantization_config = {"quant_method": "gptq"}
    _accelerate_warning_once(model, "gptq")
    hf_minivllm.restore(model)
    with pytest.raises(ValueError, match="not accelerated"):
        hf_minivllm.stats(model)
    del model.config.quantization_config
    hf_minivllm.accelerate(model, num_kvcache_blocks=64, kvcache_block_size=4)
    assert "generate" in model.__dict__ and hf_minivllm.stats(model)["unsupported_reason"] is None
    ids, mask = left_padded_batch()
    oracle = copy.deepcopy(tiny_model("llama"))
    with torch.no_grad():
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False),
                           oracle.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False))


def test_invalid_settings_still_raise():
    with pytest.raises(ValueError, match="max_num_seqs"):
        hf_minivllm.accelerate(tiny_model("llama"), max_num_seqs=0)


def test_a_call_on_a_model_with_forward_hooks_goes_to_hf_while_they_are_there():
    """HF's generate runs forward hooks at every step (activation steering, probes); the engine computes the layers
    itself and silently skipped them. Such calls go to HF; transformers' own hooks that change no value do not
    count; once the hooks are removed the engine serves again."""
    model = tiny_model("qwen3")
    oracle = copy.deepcopy(model)
    hf_minivllm.accelerate(model)
    ids, mask = left_padded_batch(lengths=(20, 13))
    settings = dict(max_new_tokens=8, do_sample=False)

    def steer(module, args, output):
        return (output[0] + 2.0, *output[1:]) if isinstance(output, tuple) else output + 2.0

    plain = oracle.generate(input_ids=ids, attention_mask=mask, **settings)
    hooks = {  # name -> (register on a model, whether it changes the answer)
        "a layer's forward hook": (lambda m: m.model.layers[1].register_forward_hook(steer), True),
        "a norm's forward pre-hook": (
            lambda m: m.model.norm.register_forward_pre_hook(lambda module, args: (args[0] + 1.0,)), True),
        "a global module hook": (lambda m: torch.nn.modules.module.register_module_forward_hook(
            lambda module, args, output: None), False),
    }
    for name, (register, changes) in hooks.items():
        handles = [register(model), register(oracle)]
        try:
            expected = oracle.generate(input_ids=ids, attention_mask=mask, **settings)
            with pytest.warns(UserWarning, match="forward hooks"):
                got = model.generate(input_ids=ids, attention_mask=mask, **settings)
        finally:
            for handle in handles:
                handle.remove()
        assert torch.equal(got, expected), name
        assert changes == (not torch.equal(expected, plain)), name
    assert hf_minivllm.stats(model)["fallbacks"] == 3

    model.enable_input_require_grads()  # transformers' own hook: the embeddings' output requires grad
    with pytest.warns(UserWarning, match="output_hidden_states"):  # HF's: it may leave its recorders installed
        model.generate(input_ids=ids, attention_mask=mask, output_hidden_states=True, return_dict_in_generate=True,
                       max_new_tokens=2)
    steps = hf_minivllm.stats(model)["steps"]
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **settings), plain)
    assert hf_minivllm.stats(model)["steps"] > steps and hf_minivllm.stats(model)["fallbacks"] == 4
