"""Config settings of the served families that the tiny test configs leave at their defaults: the engine either
generates what HF generates (fp32, greedy, token-exact) or refuses the model with ``UnsupportedModel``.

A config may carry fields its family's modeling never reads (a converted checkpoint's leftovers): the engine must
ignore them as HF does, not apply what another family would.
"""
from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, SMALL_ENGINE, tiny_config, tiny_model
from hf_minivllm import LLM, SamplingParams
from hf_minivllm.models.adapter import UnsupportedModel, build_decoder
from test_model import check_against_hf

PROMPTS = [[5, 9, 33, 2, 71, 8, 100, 17, 4, 200, 31, 12, 77], [44, 3, 19],
           [7, 250, 61, 90, 13, 18, 22, 5, 66, 101, 150, 3, 9, 87, 41, 300, 11, 12, 14, 15]]
NEW_TOKENS = 12
# Qwen3-MoE is served with transformers 5's stacked experts only (conftest.FAMILIES).
needs_stacked_experts = pytest.mark.skipif("qwen3_moe" not in FAMILIES,
                                           reason="transformers 4.x keeps one module per expert")


def hf_greedy(model, prompts: list[list[int]]) -> list[list[int]]:
    """HF's generate, one prompt at a time, never stopping early (eos is an ordinary token here)."""
    model.generation_config.eos_token_id = None
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=0)
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


def engine_greedy(model, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    with LLM(model, **SMALL_ENGINE) as llm:
        return [out["token_ids"] for out in llm.generate(prompts, params, use_tqdm=False)]


def assert_generates_as_hf(model) -> None:
    expected = hf_greedy(model, PROMPTS)
    assert engine_greedy(model, PROMPTS) == expected


YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8)


@pytest.mark.parametrize("family, overrides", [
    ("llama", dict(head_dim=32, num_key_value_heads=1, tie_word_embeddings=True)),
    ("mistral", dict(sliding_window=4, attention_bias=True, head_dim=8)),
    ("qwen3", dict(rope_parameters=dict(YARN, beta_fast=16.0, beta_slow=2.0, mscale=0.7, mscale_all_dim=0.5))),
    ("qwen2", dict(num_key_value_heads=4, rope_parameters=dict(YARN, attention_factor=1.3))),
    pytest.param("qwen3_moe", dict(norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[],
                                   num_experts_per_tok=3), marks=needs_stacked_experts),
    ("gemma2", dict(final_logit_softcapping=None, attn_logit_softcapping=None, query_pre_attn_scalar=16)),
    ("gemma3", dict(rope_local_base_freq=100.0, layer_types=None, sliding_window_pattern=2, num_hidden_layers=4)),
    ("phi3", dict(num_key_value_heads=4, sliding_window=5, hidden_act="gelu_pytorch_tanh")),
], ids=["llama", "mistral", "qwen3", "qwen2", "qwen3_moe", "gemma2", "gemma3", "phi3"])
def test_config_variants_generate_as_hf(family, overrides):
    assert_generates_as_hf(tiny_model(family, **overrides))


@needs_stacked_experts
def test_moe_experts_with_an_activation_other_than_silu_are_unsupported():
    """HF's experts apply ``hidden_act``; the engine's fused experts compute SiLU only."""
    with pytest.raises(UnsupportedModel, match="experts compute silu"):
        build_decoder(tiny_model("qwen3_moe", hidden_act="gelu_pytorch_tanh"))


def test_activation_comes_from_the_field_the_family_reads():
    """Llama's MLP applies ``hidden_act``; a ``hidden_activation`` field (Gemma's name) is not its activation."""
    assert_generates_as_hf(tiny_model("llama", hidden_activation="gelu_pytorch_tanh"))


def test_final_logit_softcap_is_applied_only_by_the_families_that_apply_it():
    """Llama's logits are not soft-capped whatever its config holds: the engine's logits are HF's."""
    check_against_hf(tiny_model("llama", final_logit_softcapping=0.5), lengths=[7, 3], new_tokens=2)


@pytest.mark.parametrize("family, overrides", [
    ("llama", dict(sliding_window=4)),
    ("llama", dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    ("llama", dict(attention_chunk_size=4)),
    ("mistral", dict(attention_chunk_size=4)),
], ids=["llama-window", "llama-window-and-layer-types", "llama-chunk", "mistral-chunk"])
def test_window_that_only_hf_generates_cache_applies_is_unsupported(family, overrides):
    """Transformers builds generate's cache from these config fields for any architecture, and drops the keys
    outside the window, but these families' attention ignores them: what HF generates is neither its own forward
    nor anything the engine computes."""
    with pytest.raises(UnsupportedModel, match="attention does not mask"):
        build_decoder(tiny_model(family, **overrides))


def test_window_in_a_llama_config_with_only_full_layers_changes_nothing():
    assert_generates_as_hf(tiny_model("llama", sliding_window=4, layer_types=["full_attention", "full_attention"]))


@pytest.mark.parametrize("family, overrides", [
    ("mistral", dict(sliding_window=4)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=0)),
    ("gemma3", dict(layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
], ids=["mistral", "qwen2", "gemma3"])
def test_model_with_its_last_layers_removed_generates_as_hf(family, overrides):
    """Layers cut off a loaded model (its config still counting them): HF runs the layers it has, each with its
    ``layer_types`` entry."""
    model = tiny_model(family, **overrides, num_hidden_layers=3)
    model.model.layers = model.model.layers[:2]
    assert_generates_as_hf(model)


def test_a_class_named_as_a_served_one_outside_transformers_is_unsupported():
    """Remote code (``trust_remote_code=True``, as Phi-3's own checkpoints offer) defines classes named as
    transformers' ones that may compute something else: the engine mirrors transformers' modeling only."""
    from transformers import LlamaForCausalLM

    remote_class = type("LlamaForCausalLM", (LlamaForCausalLM,),
                        {"__module__": "transformers_modules.example.modeling_llama"})
    with pytest.raises(UnsupportedModel, match="transformers_modules.example"):
        build_decoder(remote_class(tiny_config("llama")))
