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


class EngineGenerate:
    """``model.generate`` of an accelerated model: the engine's ``generate``, bound to it.

    A copy of the model (``copy.deepcopy``, ``torch.save`` of the module) gets transformers' own ``generate`` bound to
    the copy instead: the engine serves the original's weights, never the copy's.
    """

    __slots__ = ("__self__",)
    __func__ = staticmethod(engine_generate)
    __name__ = __qualname__ = "generate"  # what code that names a bound method reads

    def __init__(self, model: Any):
        self.__self__ = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return engine_generate(self.__self__, *args, **kwargs)

    def __reduce__(self) -> tuple:
        return _bound, (type(self.__self__).generate, self.__self__)


def _bound(function: Any, model: Any) -> types.MethodType:
    """``function`` bound to ``model`` (what ``EngineGenerate`` becomes in a copy; ``types.MethodType`` itself
    cannot be pickled)."""
    return types.MethodType(function, model)


def install(model: Any, llm: Any) -> None:
    previous = model.__dict__.get("generate")
    object.__setattr__(model, STATE_ATTRIBUTE, AcceleratedState(model, llm, previous))
    object.__setattr__(model, "generate", EngineGenerate(model))
    pipeline.install()


def install_hf_served(model: Any, reason: str) -> None:
    """Mark a model ``accelerate`` could not serve: its ``generate`` stays HF's, ``stats`` reports the reason."""
    uninstall(model)
    object.__setattr__(model, STATE_ATTRIBUTE, HFServedState(reason))


def uninstall(model: Any) -> None:
    """Remove what ``install`` set: the instance's own ``generate``, if it had one, comes back."""
    state = model.__dict__.pop(STATE_ATTRIBUTE, None)
    if isinstance(state, AcceleratedState):
        if state.previous_generate is None:
            model.__dict__.pop("generate", None)
        else:
            object.__setattr__(model, "generate", state.previous_generate)
