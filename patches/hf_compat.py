"""The few private ``GenerationMixin`` helpers whose signatures differ between transformers 4.5x and 5.x.

Told apart by the helper's own signature, not by version numbers, so a release in between behaves like the side
it resembles.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch


def takes_parameter(function: Any, name: str) -> bool:
    return name in inspect.signature(function).parameters


def resolve_generation_config(
    model: Any, generation_config: Any, kwargs: dict[str, Any], use_model_defaults: bool | None
) -> tuple[Any, dict[str, Any], bool, bool]:
    """HF's settings resolution: ``(generation_config, model_kwargs, has_default_max_length, has_default_min_length)``.

    5.x decides whether max/min length are library defaults before merging the configs, 4.5x after; each is asked
    the way its own ``generate`` asks.
    """
    if takes_parameter(model._prepare_generation_config, "use_model_defaults"):
        config, model_kwargs = model._prepare_generation_config(generation_config, use_model_defaults, **kwargs)
        has_default_max_length = kwargs.get("max_length") is None and config.max_length is not None
        has_default_min_length = kwargs.get("min_length") is None and config.min_length is not None
        return config, model_kwargs, has_default_max_length, has_default_min_length
    has_default_max_length = (
        kwargs.get("max_length") is None
        and (generation_config is None or generation_config.max_length is None)
        and model.generation_config.max_length is None
    )
    has_default_min_length = (
        kwargs.get("min_length") is None
        and (generation_config is None or generation_config.min_length is None)
        and model.generation_config.min_length is None
    )
    config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    return config, model_kwargs, has_default_max_length, has_default_min_length


def prepare_special_tokens(
    model: Any, generation_config: Any, has_attention_mask: bool, device: torch.device, batch_size: int
) -> None:
    """``_prepare_special_tokens`` (5.x also takes the batch size, to warn only for real batches)."""
    if takes_parameter(model._prepare_special_tokens, "batch_size"):
        model._prepare_special_tokens(generation_config, has_attention_mask, device=device, batch_size=batch_size)
    else:
        model._prepare_special_tokens(generation_config, has_attention_mask, device=device)
