"""Installing and removing the engine on a loaded HF model (and, at the first install, the pipeline hook)."""
from __future__ import annotations

import types
from typing import Any

from hf_minivllm.patches import pipeline
from hf_minivllm.patches.generate import generate as engine_generate
from hf_minivllm.patches.state import (
    STATE_ATTRIBUTE,
    AcceleratedState,
    HFServedState,
    is_accelerated,
    state_of,
    unsupported_reason,
)

__all__ = ["install", "install_hf_served", "uninstall", "is_accelerated", "state_of", "unsupported_reason"]


def install(model: Any, llm: Any) -> None:
    object.__setattr__(model, STATE_ATTRIBUTE, AcceleratedState(model, llm))
    object.__setattr__(model, "generate", types.MethodType(engine_generate, model))
    pipeline.install()


def install_hf_served(model: Any, reason: str) -> None:
    """Mark a model ``accelerate`` could not serve: its ``generate`` stays HF's, ``stats`` reports the reason."""
    uninstall(model)
    object.__setattr__(model, STATE_ATTRIBUTE, HFServedState(reason))


def uninstall(model: Any) -> None:
    model.__dict__.pop("generate", None)
    model.__dict__.pop(STATE_ATTRIBUTE, None)
