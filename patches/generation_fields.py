"""What the engine does with every ``GenerationConfig`` field and every ``generate()`` argument.

Four answers: the engine serves it itself (``engine``); the engine serves it by running HF's own logits processor or
stopping criterion on its batch every step (``hf-step``); it has no effect on the result (``ignored``); or the call is
handed to HF's own ``generate`` with one warning naming the setting (``fallback``).

``docs/generation_config.md`` is generated from these tables (``python -m hf_minivllm.patches.generation_fields``);
a test checks the committed file against them, that every field of the installed transformers release is listed,
and that each field really takes the path its row names.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ACTIONS = {
    "engine": "served by the engine's own scheduler, sampler and output assembly",
    "hf-step": "served: HF's own logits processor / stopping criterion runs on the engine's batch every step",
    "ignored": "no effect on the tokens or outputs returned (HF-internal, or only used by modes that fall back)",
    "fallback": "the call goes to transformers' own `generate` (one warning per reason), giving HF's exact result",
}


@dataclass(frozen=True)
class FieldPolicy:
    action: str  # a key of ACTIONS
    note: str
    active: Callable[[Any], bool] | None = None  # fallback rows: does this value need HF's generate?


def _set(value: Any) -> bool:
    return value is not None and value is not False and value != [] and value != {}


def _above(threshold: float) -> Callable[[Any], bool]:
    return lambda value: value is not None and value > threshold


def _not(default: Any) -> Callable[[Any], bool]:
    return lambda value: value is not None and value != default


def engine(note: str) -> FieldPolicy:
    return FieldPolicy("engine", note)


def hf_step(note: str) -> FieldPolicy:
    return FieldPolicy("hf-step", note)


def ignored(note: str) -> FieldPolicy:
    return FieldPolicy("ignored", note)


def fallback(note: str, active: Callable[[Any], bool] = _set) -> FieldPolicy:
    return FieldPolicy("fallback", note, active)


FIELD_POLICIES: dict[str, FieldPolicy] = {
    # length
    "max_length": engine("counts the (padded) prompt, as in HF; max_new_tokens wins when both are set"),
    "max_new_tokens": engine("the engine's max_tokens"),
    "min_length": engine("eos suppressed until the padded length reaches it"),
    "min_new_tokens": engine("the engine's min_tokens: eos suppressed until then"),
    "early_stopping": ignored("beam search only"),
    "max_time": hf_step("MaxTimeCriteria, checked after every step"),
    "stop_strings": hf_step("StopStringCriteria (needs tokenizer=, as in HF); the row ends with the matching token"),
    # strategy
    "do_sample": engine("greedy (argmax) or sampling; sampling is reproducible under torch.manual_seed"),
    "num_beams": fallback("beam search", _above(1)),
    "num_beam_groups": fallback("group beam search", _above(1)),
    "diversity_penalty": ignored("group beam search only (num_beam_groups falls back)"),
    "penalty_alpha": fallback("contrastive search", _above(0)),
    "dola_layers": fallback("DoLa decoding"),
    "use_mtp": fallback("multi-token prediction"),
    "speculation_type": fallback("speculative decoding"),
    "use_cache": ignored("the engine always uses its paged KV cache; tokens are the same"),
    "cache_implementation": fallback("a quantized KV cache changes the tokens; other HF cache choices (\"paged\" "
                                     "included) do not, and the engine uses its paged KV cache",
                                     lambda value: value == "quantized"),
    "cache_config": ignored("HF cache settings"),
    "max_cache_len": ignored("HF cache settings"),
    "return_legacy_cache": ignored("format of past_key_values, which the engine does not return (4.x only)"),
    "compile_config": ignored("HF torch.compile settings"),
    "disable_compile": ignored("HF torch.compile settings"),
    "continuous_batching_config": ignored("HF continuous batching settings"),
    "prefill_chunk_size": ignored(
        "HF prefill chunking; the engine chunks by max_num_batched_tokens (transformers 4.57's chunked prefill "
        "mishandles left padding and changes its own tokens; the engine's are the unchunked ones)"
    ),
    "low_memory": ignored("beam search only"),
    # logits manipulation
    "temperature": engine("sampling temperature"),
    "top_k": engine("top-k filter (0 or None disables)"),
    "top_p": engine("nucleus filter"),
    "min_p": engine("min-p filter"),
    "top_h": hf_step("TopHLogitsWarper"),
    "typical_p": hf_step("TypicalLogitsWarper"),
    "epsilon_cutoff": hf_step("EpsilonLogitsWarper"),
    "eta_cutoff": hf_step("EtaLogitsWarper"),
    "repetition_penalty": hf_step("RepetitionPenaltyLogitsProcessor over prompt (pads included, as in HF) + output"),
    "encoder_repetition_penalty": hf_step("EncoderRepetitionPenaltyLogitsProcessor over the prompt"),
    "length_penalty": ignored("beam search only"),
    "no_repeat_ngram_size": hf_step("NoRepeatNGramLogitsProcessor"),
    "encoder_no_repeat_ngram_size": hf_step("EncoderNoRepeatNGramLogitsProcessor"),
    "bad_words_ids": hf_step("NoBadWordsLogitsProcessor"),
    "renormalize_logits": hf_step("LogitNormalization (log-softmax of the final scores)"),
    "forced_bos_token_id": hf_step("ForcedBOSTokenLogitsProcessor"),
    "forced_eos_token_id": hf_step("ForcedEOSTokenLogitsProcessor"),
    "remove_invalid_values": hf_step("InfNanRemoveLogitsProcessor"),
    "exponential_decay_length_penalty": hf_step("ExponentialDecayLengthPenalty"),
    "suppress_tokens": hf_step("SuppressTokensLogitsProcessor"),
    "begin_suppress_tokens": hf_step("SuppressTokensAtBeginLogitsProcessor"),
    "sequence_bias": hf_step("SequenceBiasLogitsProcessor"),
    "token_healing": fallback("token healing rewrites the prompt"),
    "guidance_scale": fallback("classifier-free guidance runs the model a second time", _not(1.0)),
    "watermarking_config": fallback("watermarking (SynthID keeps per-row state)"),
    "constraints": fallback("constrained beam search"),
    "force_words_ids": fallback("constrained beam search"),
    # outputs
    "num_return_sequences": engine("rows of one prompt adjacent, as in HF"),
    "output_attentions": fallback("attention outputs"),
    "output_hidden_states": fallback("hidden-state outputs"),
    "output_scores": hf_step("processed scores of every step, [batch, vocab] each, rows that finished included"),
    "output_logits": hf_step("raw logits of every step, [batch, vocab] each"),
    "return_dict_in_generate": engine("GenerateDecoderOnlyOutput; past_key_values is None (the KV cache is paged)"),
    # special tokens
    "pad_token_id": engine("pads finished rows (HF's first-eos fallback when unset)"),
    "bos_token_id": ignored("only used by HF when no input is given, which falls back"),
    "eos_token_id": engine("int or list; the eos token is kept, then padding"),
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

ARGUMENT_POLICIES: dict[str, FieldPolicy] = {
    "inputs / input_ids": engine("2-D token ids; each row becomes one engine request"),
    "attention_mask": engine("must be left padding (zeros, then ones); anything else falls back"),
    "generation_config": engine("HF's precedence: kwargs > generation_config= > model.generation_config > defaults"),
    "logits_processor": hf_step("merged with the built-in processors exactly as HF merges them"),
    "stopping_criteria": hf_step("merged with the built-in criteria exactly as HF merges them"),
    "prefix_allowed_tokens_fn": hf_step("PrefixConstrainedLogitsProcessor; batch_id is the row, as in HF"),
    "streamer": engine("put(prompt ids), put(tokens of every step, [batch]), end(): HF's call sequence"),
    "tokenizer": hf_step("used by stop_strings"),
    "use_model_defaults": engine("passed to HF's settings resolution (4.x only)"),
    "synced_gpus": ignored("multi-GPU HF generate only"),
    "trust_remote_code": ignored("only used with custom_generate, which falls back"),
    "assistant_model": fallback("assisted decoding"),
    "assistant_tokenizer": fallback("assisted decoding"),
    "negative_prompt_ids": fallback("classifier-free guidance"),
    "negative_prompt_attention_mask": fallback("classifier-free guidance"),
    "custom_generate": fallback("a custom decoding loop"),
    "inputs_embeds, past_key_values, position_ids, cache_position, token_type_ids": fallback(
        "the engine takes token ids and builds its own cache and positions"
    ),
}

# Named arguments of HF's generate that decide a fallback whenever they are given.
FALLBACK_ARGUMENTS = ("assistant_model", "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate")
FALLBACK_MODEL_KWARGS = ("inputs_embeds", "past_key_values", "position_ids", "cache_position", "token_type_ids")


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


def _table(policies: dict[str, FieldPolicy], heading: str) -> list[str]:
    lines = [f"| {heading} | served how | notes |", "|---|---|---|"]
    for name in sorted(policies, key=lambda name: (list(ACTIONS).index(policies[name].action), name.lstrip("_"))):
        policy = policies[name]
        lines.append(f"| `{name}` | {policy.action} | {policy.note} |")
    return lines


def render_markdown() -> str:
    """The text of ``docs/generation_config.md``."""
    lines = [
        "# GenerationConfig and generate() arguments under hf-minivllm",
        "",
        "Generated from `patches/generation_fields.py` by `python -m hf_minivllm.patches.generation_fields`; "
        "a test keeps this file, the tables and the code's behaviour in step.",
        "",
        "| served how | meaning |",
        "|---|---|",
        *(f"| {action} | {meaning} |" for action, meaning in ACTIONS.items()),
        "",
        "A call that needs no `hf-step` row runs entirely inside the engine. One that does (a processor, a stopping "
        "criterion, scores or logits to return) still runs in the engine's batch; HF's processors and criteria see "
        "the same `input_ids` (left-padded prompt, pads included, plus the tokens so far) and the same batch rows "
        "as under HF. Fields a transformers release does not know are simply absent from its configs; a field this "
        "table does not know falls back whenever it differs from its default.",
        "",
        "## GenerationConfig fields",
        "",
        *_table(FIELD_POLICIES, "field"),
        "",
        "## generate() arguments",
        "",
        *_table(ARGUMENT_POLICIES, "argument"),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render_markdown())
