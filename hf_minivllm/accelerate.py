"""``accelerate(model)``: the one line that puts the engine behind an existing transformers model."""
from __future__ import annotations

import logging
import warnings
from typing import Any

from hf_minivllm.engine.stats import EngineStats
from hf_minivllm.llm import LLM
from hf_minivllm.models.adapter import UnsupportedModel, spread_size, unwrap_model

logger = logging.getLogger(__name__)


def accelerate(model: Any, **config: Any) -> Any:
    """Patch a loaded HF causal LM in place and return it (same object, class, config and generation_config).

    ``model.generate`` then runs through the engine; ``model(...)``, ``save_pretrained`` and the rest are HF's.
    ``config`` takes the engine's settings (see ``hf_minivllm.Config``). A second call returns the model as is.

    Unlike ``LLM``, the KV cache is on demand by default (``kv_cache_resident=False``): it takes what the requests
    in hand need and gives it back when generation is idle, so training steps and other models share the GPU as
    they would without ``accelerate``. The model may keep training: every ``generate`` sees its current weights.

    A model the engine cannot serve (another architecture, quantized or wrapped layers, an unsupported dtype) is
    returned with transformers' own ``generate`` in place and one warning naming the reason, which
    ``hf_minivllm.stats(model)["unsupported_reason"]`` also reports: the program goes on working, at HF's speed.
    Invalid settings in ``config`` still raise ``ValueError``.

    A PEFT ``PeftModel`` is served with its active LoRA adapters (its ``generate`` reaches the transformers model
    inside, which is the one patched); switching, disabling, merging or training adapters is seen by the next call.
    A ``torch.compile``'d model is served likewise through the model it wraps.
    """
    from hf_minivllm.patches.model import install, install_hf_served, is_accelerated

    target = unwrap_model(model)
    if is_accelerated(target):
        if config:
            logger.warning("model is already accelerated; ignoring %s (call hf_minivllm.restore first)", sorted(config))
        return model
    try:
        if "tensor_parallel_size" not in config:
            config["tensor_parallel_size"] = spread_size(target)  # device_map="auto": shard it where it lies
        if config.get("kv_cache_resident") is None:
            config["kv_cache_resident"] = config["tensor_parallel_size"] > 1  # sharded caches are resident
        llm = LLM(target, **config)
    except UnsupportedModel as error:
        warnings.warn(f"hf-minivllm: this model keeps transformers' own generate ({error})", UserWarning,
                      stacklevel=2)
        install_hf_served(target, str(error))
        return model
    install(target, llm)
    return model


def restore(model: Any) -> Any:
    """Undo ``accelerate``: ``model.generate`` is HF's again and the engine (and its KV cache) is released."""
    from hf_minivllm.patches.model import is_accelerated, state_of, uninstall

    target = unwrap_model(model)
    if is_accelerated(target):
        state_of(target).llm.close()
    uninstall(target)
    return model


def _llm_of(model_or_llm: Any) -> LLM:
    from hf_minivllm.patches.model import state_of

    return model_or_llm if isinstance(model_or_llm, LLM) else state_of(unwrap_model(model_or_llm)).llm


def stats(model_or_llm: Any) -> dict:
    """The engine's counters for an accelerated model or an ``LLM``: requests, tokens, cache hits, fallbacks, and
    ``unsupported_reason`` (why ``accelerate`` left the model to transformers; None when the engine serves it)."""
    from hf_minivllm.patches.model import unsupported_reason

    reason = None if isinstance(model_or_llm, LLM) else unsupported_reason(unwrap_model(model_or_llm))
    if reason is not None:
        return {**EngineStats().as_dict(), "unsupported_reason": reason}
    return {**_llm_of(model_or_llm).stats.as_dict(), "unsupported_reason": None}


def reset_prefix_cache(model_or_llm: Any) -> None:
    """Stop the engine of an accelerated model or an ``LLM`` from reusing any KV computed so far.

    Weight changes are noticed by themselves at the next call (version counters, data pointers); this is for
    changes no counter sees, such as ``param.data.add_(...)``, or to start measurements from a cold cache. A model
    ``accelerate`` left to transformers has no cache: nothing to do.
    """
    from hf_minivllm.patches.model import unsupported_reason

    if not isinstance(model_or_llm, LLM) and unsupported_reason(unwrap_model(model_or_llm)) is not None:
        return
    _llm_of(model_or_llm).reset_prefix_cache()
