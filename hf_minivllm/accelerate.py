"""``accelerate(model)``: the one line that puts the engine behind an existing transformers model."""
from __future__ import annotations

import logging
from typing import Any

from hf_minivllm.llm import LLM

logger = logging.getLogger(__name__)


def accelerate(model: Any, **config: Any) -> Any:
    """Patch a loaded HF causal LM in place and return it (same object, class, config and generation_config).

    ``model.generate`` then runs through the engine; ``model(...)``, ``save_pretrained`` and the rest are HF's.
    ``config`` takes the engine's settings (see ``hf_minivllm.Config``). A second call returns the model as is.
    """
    from hf_minivllm.patches.model import install, is_accelerated

    if is_accelerated(model):
        if config:
            logger.warning("model is already accelerated; ignoring %s (call hf_minivllm.restore first)", sorted(config))
        return model
    install(model, LLM(model, **config))
    return model


def restore(model: Any) -> Any:
    """Undo ``accelerate``: ``model.generate`` is HF's again and the engine (and its KV cache) is released."""
    from hf_minivllm.patches.model import uninstall

    uninstall(model)
    return model


def stats(model_or_llm: Any) -> dict:
    """The engine's counters for an accelerated model or an ``LLM``: requests, tokens, cache hits, fallbacks."""
    from hf_minivllm.patches.model import state_of

    llm = model_or_llm if isinstance(model_or_llm, LLM) else state_of(model_or_llm).llm
    return llm.stats.as_dict()
