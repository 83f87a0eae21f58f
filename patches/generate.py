"""``model.generate`` served by the engine, with HF's output contract; anything it cannot serve goes to HF.

Settings are resolved by HF's own helpers in HF's order (explicit kwargs > ``generation_config=`` >
``model.generation_config`` > library defaults; length and special-token preparation), so the engine sees exactly
what HF's decoding loop would. Rows of the left-padded batch become independent engine requests (padding
stripped, positions from 0, as HF derives them from the attention mask); the results are put back into HF's
``[batch * num_return_sequences, prompt_len + longest]`` tensor, finished rows padded with ``pad_token_id``.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from hf_minivllm.patches.generation_fields import fallback_reason
from hf_minivllm.patches.state import state_of
from hf_minivllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

GENERATE_ARGUMENTS = (
    "logits_processor",
    "stopping_criteria",
    "prefix_allowed_tokens_fn",
    "synced_gpus",
    "assistant_model",
    "streamer",
    "negative_prompt_ids",
    "negative_prompt_attention_mask",
    "custom_generate",
)


class _Fallback(Exception):
    """Raised inside preparation when the call must go to HF's own generate; carries the reason."""


def _argument_fallback(arguments: dict[str, Any], model_kwargs: dict[str, Any]) -> str | None:
    for name in GENERATE_ARGUMENTS:
        value = arguments.get(name)
        if name == "synced_gpus" or value is None:
            continue
        if name in ("logits_processor", "stopping_criteria") and len(value) == 0:
            continue
        return f"{name}= (not served by the engine yet)"
    for name in ("inputs_embeds", "past_key_values", "position_ids", "cache_position", "token_type_ids"):
        if model_kwargs.get(name) is not None:
            return f"{name}= (the engine takes token ids and builds its own cache and positions)"
    return None


def _left_padded_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """Each row's real tokens; raises _Fallback unless every row is left-padded (zeros, then ones)."""
    mask = attention_mask.to(torch.bool)
    lengths = mask.sum(dim=1)
    width = input_ids.shape[1]
    positions = torch.arange(width, device=mask.device)
    expected = positions[None, :] >= (width - lengths)[:, None]
    if not torch.equal(mask, expected):
        raise _Fallback("attention_mask is not left padding (right padding or holes)")
    if int(lengths.min()) == 0:
        raise _Fallback("a row of the batch has no tokens")
    ids = input_ids.tolist()
    return [row[width - n :] for row, n in zip(ids, lengths.tolist())]


def _as_id_list(tensor: torch.Tensor | None) -> list[int]:
    if tensor is None:
        return []
    return [int(t) for t in tensor.reshape(-1).tolist()]


def _engine_requests(model, llm, arguments: dict[str, Any], kwargs: dict[str, Any]):
    """Resolve the call the way HF's generate does; returns what the engine needs, or raises _Fallback."""
    inputs = arguments.get("inputs")
    user_generation_config = arguments.get("generation_config")
    has_default_max_length = (
        kwargs.get("max_length") is None
        and (user_generation_config is None or user_generation_config.max_length is None)
        and model.generation_config.max_length is None
    )
    has_default_min_length = (
        kwargs.get("min_length") is None
        and (user_generation_config is None or user_generation_config.min_length is None)
        and model.generation_config.min_length is None
    )
    generation_config, model_kwargs = model._prepare_generation_config(user_generation_config, **kwargs)
    model._validate_model_kwargs(model_kwargs.copy())
    reason = _argument_fallback(arguments, model_kwargs) or fallback_reason(generation_config)
    if reason:
        raise _Fallback(reason)
    mode = generation_config.get_generation_mode(arguments.get("assistant_model"))
    if mode.value not in ("greedy_search", "sample"):
        raise _Fallback(f"generation mode {mode.value}")

    input_ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
    if input_ids is None or not torch.is_tensor(input_ids) or input_ids.dim() != 2:
        raise _Fallback("no 2-D input_ids given")
    attention_mask = model_kwargs.get("attention_mask")
    model._prepare_special_tokens(generation_config, attention_mask is not None, device=input_ids.device)
    if attention_mask is None:
        attention_mask = model._prepare_attention_mask_for_generation(input_ids, generation_config, model_kwargs)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
    width = input_ids.shape[1]
    generation_config = model._prepare_generated_length(
        generation_config=generation_config,
        has_default_max_length=has_default_max_length,
        has_default_min_length=has_default_min_length,
        model_input_name="input_ids",
        input_ids_length=width,
        inputs_tensor=input_ids,
    )
    model._validate_generated_length(generation_config, width, has_default_max_length)

    rows = _left_padded_rows(input_ids, attention_mask)
    max_new = generation_config.max_length - width
    min_new = max(0, (generation_config.min_length or 0) - width)
    engine = llm.engine
    longest = max(len(row) for row in rows) + max_new
    if longest > engine.max_sequence_tokens:
        raise _Fallback(
            f"prompt + {max_new} new tokens = {longest} tokens exceeds the engine's limit of {engine.max_sequence_tokens}"
        )
    eos_ids = _as_id_list(generation_config._eos_token_tensor)
    pad = generation_config._pad_token_tensor
    pad_id = int(pad.reshape(-1)[0]) if pad is not None else (eos_ids[0] if eos_ids else 0)
    if generation_config.do_sample:
        sampling = dict(
            temperature=float(generation_config.temperature if generation_config.temperature is not None else 1.0),
            top_k=int(generation_config.top_k or 0),
            top_p=float(generation_config.top_p if generation_config.top_p is not None else 1.0),
            min_p=float(generation_config.min_p or 0.0),
        )
    else:
        sampling = dict(temperature=0.0)
    params = SamplingParams(
        max_tokens=max_new,
        min_tokens=min(min_new, max_new),
        ignore_eos=True,
        stop_token_ids=eos_ids,
        **sampling,
    )
    copies = generation_config.num_return_sequences or 1
    prompts = [row for row in rows for _ in range(copies)]
    return input_ids.repeat_interleave(copies, dim=0), prompts, params, pad_id


def _assemble(input_ids: torch.Tensor, completions: list[list[int]], pad_id: int) -> torch.Tensor:
    longest = max(len(tokens) for tokens in completions)
    generated = torch.full((len(completions), longest), pad_id, dtype=input_ids.dtype)
    for row, tokens in enumerate(completions):
        generated[row, : len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
    return torch.cat([input_ids, generated.to(input_ids.device)], dim=1)


def generate(model, inputs: torch.Tensor | None = None, generation_config=None, **kwargs):
    """Drop-in for ``GenerationMixin.generate`` on an accelerated model."""
    state = state_of(model)
    arguments = {"inputs": inputs, "generation_config": generation_config}
    for name in GENERATE_ARGUMENTS:
        if name in kwargs:
            arguments[name] = kwargs.pop(name)
    try:
        input_ids, prompts, params, pad_id = _engine_requests(model, state.llm, arguments, dict(kwargs))
    except _Fallback as fallback:
        return state.fall_back(str(fallback), inputs, generation_config, arguments, kwargs)
    seqs = state.llm.generate_sequences(prompts, [params] * len(prompts))
    return _assemble(input_ids, [seq.completion_token_ids for seq in seqs], pad_id)

