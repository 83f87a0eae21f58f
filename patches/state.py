"""The engine state that ``accelerate`` attaches to a model, and the fallback to HF's own ``generate``."""
from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

STATE_ATTRIBUTE = "_hf_minivllm"


class AcceleratedState:
    """What ``accelerate`` attaches to a model: its engine and the fallback path to HF's own ``generate``.

    ``previous_generate``: a ``generate`` the instance itself had (set on it before ``accelerate``), which
    ``restore`` puts back.
    """

    def __init__(self, model: Any, llm: Any, previous_generate: Callable[..., Any] | None = None):
        self.model = model
        self.llm = llm
        self.previous_generate = previous_generate
        self.warned: set[str] = set()

    def __reduce__(self) -> tuple:
        """A copy of the model (``copy.deepcopy``, ``torch.save`` of the module) holds None here: the engine, its
        threads and its KV cache serve the original's weights, and stay with it."""
        return _no_state, ()

    def fall_back(self, reason: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        """Record and warn (once per reason), then run HF's original generate on the same arguments."""
        self.llm.stats.record_fallback(reason)
        if reason not in self.warned:
            self.warned.add(reason)
            warnings.warn(f"hf-minivllm: handing this generate call to transformers ({reason})", UserWarning, stacklevel=4)
        return type(self.model).generate(self.model, *args, **kwargs)


def _no_state() -> None:
    """What ``AcceleratedState`` becomes in a copy of its model."""
    return None


class HFServedState:
    """What ``accelerate`` attaches to a model the engine cannot serve: why (``hf_minivllm.stats`` reports it);
    ``generate`` stays transformers' own."""

    def __init__(self, reason: str):
        self.reason = reason


def unsupported_reason(model: Any) -> str | None:
    """Why ``accelerate`` left this model to transformers, or None."""
    state = model.__dict__.get(STATE_ATTRIBUTE)
    return state.reason if isinstance(state, HFServedState) else None


def is_accelerated(model: Any) -> bool:
    return isinstance(model.__dict__.get(STATE_ATTRIBUTE), AcceleratedState)


def state_of(model: Any) -> AcceleratedState:
    if not is_accelerated(model):
        raise ValueError("this model is not accelerated: call hf_minivllm.accelerate(model) first")
    return model.__dict__[STATE_ATTRIBUTE]


_redirects = threading.local()  # per thread: id(model) -> the function its generate calls go to


@contextmanager
def generate_redirected(model: Any, function: Callable[..., Any]) -> Iterator[None]:
    """In this thread only, send ``model.generate`` calls to ``function`` (other threads keep the engine)."""
    table = _redirects.__dict__.setdefault("table", {})
    previous = table.get(id(model))
    table[id(model)] = function
    try:
        yield
    finally:
        if previous is None:
            del table[id(model)]
        else:
            table[id(model)] = previous


def redirect_of(model: Any) -> Callable[..., Any] | None:
    """The function this thread's ``model.generate`` calls go to, if ``generate_redirected`` is active."""
    table = getattr(_redirects, "table", None)
    return table.get(id(model)) if table else None
