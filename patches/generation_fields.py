"""What the engine does with every ``GenerationConfig`` field: serve it, ignore it (no effect on the tokens), or
hand the call back to HF's own ``generate``. ``docs/generation_config.md`` is generated from this table and a test
checks that every field of the installed transformers release is listed here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FieldPolicy:
    action: str  # "served", "ignored" or "fallback"
    note: str
    active: Callable[[Any], bool] | None = None  # fallback fields: does this value need HF's generate?


def _set(value: Any) -> bool:
    return value is not None and value is not False and value != [] and value != {}


def _above(threshold: float) -> Callable[[Any], bool]:
    return lambda value: value is not None and value > threshold


def _not(default: Any) -> Callable[[Any], bool]:
    return lambda value: value is not None and value != default


def served(note: str) -> FieldPolicy:
    return FieldPolicy("served", note)


def ignored(note: str) -> FieldPolicy:
    return FieldPolicy("ignored", note)


def fallback(note: str, active: Callable[[Any], bool] = _set) -> FieldPolicy:
    return FieldPolicy("fallback", note, active)


FIELD_POLICIES: dict[str, FieldPolicy] = {
    # length
    "max_length": served("counts the (padded) prompt, as in HF"),
    "max_new_tokens": served("the engine's max_tokens"),
    "min_length": served("eos suppressed until the padded length reaches it"),
    "min_new_tokens": served("the engine's min_tokens: eos suppressed until then"),
    "early_stopping": ignored("beam search only"),
    "max_time": fallback("time-based stopping criterion"),
    "stop_strings": fallback("string stopping criterion"),
    # strategy
    "do_sample": served("greedy (argmax) or sampling"),
    "num_beams": fallback("beam search", _above(1)),
    "num_beam_groups": fallback("group beam search", _above(1)),
    "diversity_penalty": ignored("group beam search only (num_beam_groups falls back)"),
    "penalty_alpha": fallback("contrastive search", _above(0)),
    "dola_layers": fallback("DoLa decoding"),
    "use_mtp": fallback("multi-token prediction"),
    "speculation_type": fallback("speculative decoding"),
    "use_cache": ignored("the engine always uses its paged KV cache; tokens are the same"),
    "cache_implementation": ignored("HF cache choice; the engine uses its paged KV cache"),
    "cache_config": ignored("HF cache settings"),
    "max_cache_len": ignored("HF cache settings"),
    "compile_config": ignored("HF torch.compile settings"),
    "disable_compile": ignored("HF torch.compile settings"),
    "continuous_batching_config": ignored("HF continuous batching settings"),
    "prefill_chunk_size": ignored("HF prefill chunking; the engine chunks by max_num_batched_tokens"),
    "low_memory": ignored("beam search only"),
    # logits manipulation
    "temperature": served("sampling temperature"),
    "top_k": served("top-k filter (0 or None disables)"),
    "top_p": served("nucleus filter"),
    "min_p": served("min-p filter"),
    "top_h": fallback("top-H sampling"),
    "typical_p": fallback("typical sampling", _not(1.0)),
    "epsilon_cutoff": fallback("epsilon sampling", _above(0.0)),
    "eta_cutoff": fallback("eta sampling", _above(0.0)),
    "repetition_penalty": fallback("repetition penalty", _not(1.0)),
    "encoder_repetition_penalty": fallback("encoder repetition penalty", _not(1.0)),
    "length_penalty": ignored("beam search only"),
    "no_repeat_ngram_size": fallback("n-gram blocking", _above(0)),
    "encoder_no_repeat_ngram_size": fallback("encoder n-gram blocking", _above(0)),
    "bad_words_ids": fallback("bad-words filter"),
    "renormalize_logits": fallback("renormalized scores"),
    "forced_bos_token_id": fallback("forced BOS token"),
    "forced_eos_token_id": fallback("forced EOS token"),
    "remove_invalid_values": ignored("only changes NaN/inf logits, which the engine never samples"),
    "exponential_decay_length_penalty": fallback("length-decay penalty"),
    "suppress_tokens": fallback("token suppression"),
    "begin_suppress_tokens": fallback("first-token suppression"),
    "sequence_bias": fallback("sequence bias"),
    "token_healing": fallback("token healing"),
    "guidance_scale": fallback("classifier-free guidance", _not(1.0)),
    "watermarking_config": fallback("watermarking"),
    "constraints": fallback("constrained beam search"),
    "force_words_ids": fallback("constrained beam search"),
    # outputs
    "num_return_sequences": served("rows of one prompt adjacent, as in HF"),
    "output_attentions": fallback("attention outputs"),
    "output_hidden_states": fallback("hidden-state outputs"),
    "output_scores": fallback("per-step scores"),
    "output_logits": fallback("per-step logits"),
    "return_dict_in_generate": fallback("GenerateDecoderOnlyOutput"),
    # special tokens
    "pad_token_id": served("pads finished rows (HF's first-eos fallback when unset)"),
    "bos_token_id": ignored("only used by HF when no input is given, which falls back"),
    "eos_token_id": served("int or list; the eos token is kept, then padding"),
    "decoder_start_token_id": ignored("encoder-decoder models only"),
    # assisted generation
    "is_assistant": ignored("assistant-model metadata"),
    "num_assistant_tokens": ignored("assisted decoding only (assistant_model falls back)"),
    "num_assistant_tokens_schedule": ignored("assisted decoding only"),
    "assistant_confidence_threshold": ignored("assisted decoding only"),
    "prompt_lookup_num_tokens": fallback("prompt-lookup decoding"),
    "max_matching_ngram_size": ignored("prompt-lookup decoding only"),
    "assistant_early_exit": fallback("self-speculative decoding"),
    "assistant_lookbehind": ignored("assisted decoding only"),
    "target_lookbehind": ignored("assisted decoding only"),
    "assistant_ensemble_weight": ignored("assisted decoding only"),
    # metadata
    "_from_model_config": ignored("metadata"),
    "transformers_version": ignored("metadata"),
}


def fallback_reason(generation_config: Any) -> str | None:
    """The first setting of ``generation_config`` the engine cannot serve, as ``"name=value (what)"``, or None.

    A field missing from the table (a newer transformers release) falls back whenever it differs from its default.
    """
    from transformers import GenerationConfig

    defaults = GenerationConfig().to_dict()
    for name, value in generation_config.to_dict().items():
        policy = FIELD_POLICIES.get(name)
        if policy is None:
            if value is not None and value != defaults.get(name):
                return f"{name}={value!r} (a setting hf-minivllm does not know)"
        elif policy.action == "fallback" and policy.active(value):
            return f"{name}={value!r} ({policy.note})"
    return None
