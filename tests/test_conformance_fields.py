"""The field table cannot drift: docs/generation_config.md is generated from it, it lists every field and generate()
argument of the installed transformers, and every field really takes the path its row names."""
import inspect
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, GenerationMixin

import hf_minivllm
from hf_minivllm.patches import generation_fields
from hf_minivllm.patches.generation_fields import ARGUMENT_POLICIES, FIELD_POLICIES, fallback_reason, render_markdown
from test_conformance import MAX_NEW, Pair

DOC = Path(__file__).resolve().parent.parent / "docs" / "generation_config.md"
INSTALLED_FIELDS = sorted(GenerationConfig().to_dict())
SAMPLING = dict(do_sample=True)

# A value for each field that exercises it (plus settings it needs), for every row that generation can check.
SAMPLES = {
    # engine
    "max_length": dict(max_length=15),
    "max_new_tokens": dict(max_new_tokens=4),
    "min_length": dict(min_length=16),
    "min_new_tokens": dict(min_new_tokens=3),
    "do_sample": dict(do_sample=True),
    "temperature": dict(temperature=0.7, **SAMPLING),
    "top_k": dict(top_k=5, **SAMPLING),
    "top_p": dict(top_p=0.8, **SAMPLING),
    "min_p": dict(min_p=0.1, **SAMPLING),
    "num_return_sequences": dict(num_return_sequences=2, **SAMPLING),
    "return_dict_in_generate": dict(return_dict_in_generate=True),
    "pad_token_id": dict(pad_token_id=5),
    "eos_token_id": dict(eos_token_id=[2, 3]),
    # hf-step
    "max_time": dict(max_time=600.0),
    "stop_strings": dict(stop_strings=["the"]),
    "top_h": dict(top_h=0.5, **SAMPLING),
    "typical_p": dict(typical_p=0.9, **SAMPLING),
    "epsilon_cutoff": dict(epsilon_cutoff=0.001, **SAMPLING),
    "eta_cutoff": dict(eta_cutoff=0.001, **SAMPLING),
    "repetition_penalty": dict(repetition_penalty=1.2),
    "encoder_repetition_penalty": dict(encoder_repetition_penalty=1.2),
    "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
    "encoder_no_repeat_ngram_size": dict(encoder_no_repeat_ngram_size=2),
    "bad_words_ids": dict(bad_words_ids=[[5]]),
    "renormalize_logits": dict(renormalize_logits=True),
    "forced_bos_token_id": dict(forced_bos_token_id=5),
    "forced_eos_token_id": dict(forced_eos_token_id=2),
    "remove_invalid_values": dict(remove_invalid_values=True),
    "exponential_decay_length_penalty": dict(exponential_decay_length_penalty=(2, 1.1)),
    "suppress_tokens": dict(suppress_tokens=[5]),
    "begin_suppress_tokens": dict(begin_suppress_tokens=[5]),
    "sequence_bias": dict(sequence_bias={(5,): -1.0}),
    "output_scores": dict(output_scores=True, return_dict_in_generate=True),
    "output_logits": dict(output_logits=True, return_dict_in_generate=True),
    "cache_implementation": dict(cache_implementation="quantized"),
    # ignored
    "early_stopping": dict(early_stopping=True),
    "diversity_penalty": dict(diversity_penalty=0.5),
    "use_cache": dict(use_cache=False),
    "max_cache_len": dict(max_cache_len=64),
    "return_legacy_cache": dict(return_legacy_cache=False),
    "disable_compile": dict(disable_compile=True),
    "prefill_chunk_size": dict(prefill_chunk_size=8),
    "low_memory": dict(low_memory=True),
    "length_penalty": dict(length_penalty=2.0),
    "bos_token_id": dict(bos_token_id=1),
    "decoder_start_token_id": dict(decoder_start_token_id=1),
    "num_assistant_tokens": dict(num_assistant_tokens=3),
    "num_assistant_tokens_schedule": dict(num_assistant_tokens_schedule="constant"),
    "assistant_confidence_threshold": dict(assistant_confidence_threshold=0.5),
    "max_matching_ngram_size": dict(max_matching_ngram_size=3),
    "assistant_lookbehind": dict(assistant_lookbehind=5),
    "target_lookbehind": dict(target_lookbehind=5),
    "assistant_ensemble_weight": dict(assistant_ensemble_weight=0.5),
    # fallback (checked through fallback_reason: several cannot even run on these models)
    "num_beams": dict(num_beams=2),
    "num_beam_groups": dict(num_beam_groups=2),
    "penalty_alpha": dict(penalty_alpha=0.6),
    "dola_layers": dict(dola_layers="high"),
    "use_mtp": dict(use_mtp=True),
    "speculation_type": dict(speculation_type="dflash"),
    "token_healing": dict(token_healing=True),
    "guidance_scale": dict(guidance_scale=1.5),
    "watermarking_config": dict(watermarking_config={"greenlist_ratio": 0.25}),
    "constraints": dict(constraints=["placeholder"]),
    "force_words_ids": dict(force_words_ids=[[5]]),
    "output_attentions": dict(output_attentions=True),
    "output_hidden_states": dict(output_hidden_states=True),
    "prompt_lookup_num_tokens": dict(prompt_lookup_num_tokens=3),
    "assistant_early_exit": dict(assistant_early_exit=1),
}
# Rows not exercised by generating: HF metadata and settings objects HF only reads in its own cache/compile paths.
NOT_EXERCISED = {"_from_model_config", "transformers_version", "is_assistant", "cache_config", "compile_config", "continuous_batching_config"}


def test_committed_doc_is_generated_from_the_table():
    assert DOC.read_text() == render_markdown(), "regenerate: python -m hf_minivllm.patches.generation_fields > docs/generation_config.md"


def test_every_installed_field_and_argument_is_in_the_table():
    assert [name for name in INSTALLED_FIELDS if name not in FIELD_POLICIES] == []
    documented = {part.strip() for key in ARGUMENT_POLICIES for part in key.replace(" / ", ", ").split(",")}
    parameters = inspect.signature(GenerationMixin.generate).parameters
    arguments = [name for name, p in parameters.items() if name != "self" and p.kind is not p.VAR_KEYWORD]
    assert [name for name in arguments if name not in documented] == []
    assert set(FIELD_POLICIES) <= set(SAMPLES) | NOT_EXERCISED
    assert all(policy.action in generation_fields.ACTIONS for policy in (*FIELD_POLICIES.values(), *ARGUMENT_POLICIES.values()))


@pytest.fixture(scope="module")
def pair():
    return Pair("qwen2")


@pytest.mark.parametrize("field", [f for f in INSTALLED_FIELDS if f in SAMPLES and FIELD_POLICIES[f].action != "fallback"])
def test_served_field_takes_its_path(pair, field, request):
    policy = FIELD_POLICIES[field]
    settings = {"max_new_tokens": MAX_NEW, "do_sample": False, **SAMPLES[field]}
    if field == "max_length":
        del settings["max_new_tokens"]
    if field == "stop_strings":
        settings["tokenizer"] = request.getfixturevalue("smollm2")[1]
    # An ignored field must give what the call gives without it (HF itself may differ: 4.57's chunked prefill
    # mishandles left padding, so prefill_chunk_size changes HF's own tokens).
    oracle_settings = {k: v for k, v in settings.items() if k != field} if policy.action == "ignored" else None
    torch.manual_seed(0)
    got, expected = pair.both(oracle_settings, **settings)
    assert pair.used_step_hook() == (policy.action == "hf-step"), f"{field} is listed as {policy.action}"
    if not settings["do_sample"]:
        sequences = (got, expected) if torch.is_tensor(got) else (got.sequences, expected.sequences)
        assert torch.equal(*sequences), f"{field} changed the tokens"


@pytest.mark.parametrize("field", [f for f in INSTALLED_FIELDS if FIELD_POLICIES[f].action == "fallback"])
def test_fallback_field_is_named_as_the_reason(field):
    config = GenerationConfig()
    for name, value in SAMPLES[field].items():
        setattr(config, name, value)
    reason = fallback_reason(config)
    assert reason is not None and reason.startswith(f"{field}=")


def test_a_field_the_table_does_not_know_falls_back(monkeypatch):
    monkeypatch.delitem(FIELD_POLICIES, "repetition_penalty")
    assert "does not know" in fallback_reason(GenerationConfig(repetition_penalty=1.2))
    assert fallback_reason(GenerationConfig()) is None


def test_fallback_end_to_end_names_the_field():
    pair = Pair("llama")
    with pytest.warns(UserWarning, match="output_hidden_states"):
        got = pair.model.generate(pair.ids[:1], max_new_tokens=3, output_hidden_states=True, return_dict_in_generate=True)
    assert got.hidden_states is not None and hf_minivllm.stats(pair.model)["fallbacks"] == 1
