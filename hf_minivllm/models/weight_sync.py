"""Noticing that the HF model's weights changed since the decoder was built, cheaply, at every call.

Each tensor the decoder was built from (``DecoderForCausalLM.weight_sources``) is remembered by identity, data
pointer, version counter, dtype, device and shape. No weight is read or hashed:

- a new version counter only (optimizer steps, ``load_state_dict``, in-place edits under ``torch.no_grad``): the
  engine already computes with the new numbers (it shares the storage), only KV computed before is stale;
- anything else (a replaced parameter object, ``model.to(dtype/device)``, ``param.data = ...``, PEFT's safe merge):
  the decoder must be rebuilt from the model.

Some updates bypass version counters: PyTorch's fused optimizers (``AdamW(fused=True)``, HF Trainer's default
``adamw_torch_fused``) and edits through ``param.data`` in place. Optimizer steps are caught by a process-wide
optimizer step hook that counts the steps of each optimizer; a step of an optimizer holding a watched parameter
counts as new values. ``param.data`` edits stay invisible; ``hf_minivllm.reset_prefix_cache`` covers them.
"""
from __future__ import annotations

import enum
import threading
import weakref
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer


class _OptimizerSteps:
    """Counts every optimizer's steps (one global post-step hook, registered on first use)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.total = 0
        self.per_optimizer: weakref.WeakKeyDictionary[Optimizer, int] = weakref.WeakKeyDictionary()
        self.hook = None

    def ensure_hooked(self) -> None:
        with self.lock:
            if self.hook is None:
                from torch.optim.optimizer import register_optimizer_step_post_hook

                self.hook = register_optimizer_step_post_hook(self._count)

    def _count(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        with self.lock:
            self.per_optimizer[optimizer] = self.per_optimizer.get(optimizer, 0) + 1
            self.total += 1

    def since(self, seen: weakref.WeakKeyDictionary) -> list[Optimizer]:
        """Optimizers that stepped since ``seen`` (optimizer -> count) was last updated; updates it."""
        with self.lock:
            stepped = [opt for opt, count in self.per_optimizer.items() if seen.get(opt) != count]
            for opt in stepped:
                seen[opt] = self.per_optimizer[opt]
        return stepped


_OPTIMIZER_STEPS = _OptimizerSteps()


class WeightChange(enum.Enum):
    NONE = enum.auto()
    VALUES = enum.auto()  # same tensors, new numbers
    TENSORS = enum.auto()  # new tensors (storage, dtype, device or objects): rebuild the decoder


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


def _lookup(module: nn.Module, name: str) -> Any:
    tensor = module._parameters.get(name)
    return tensor if tensor is not None or name in module._parameters else module._buffers.get(name)


class WeightWatcher:
    """Remembers the state of ``sources`` (``(module, attribute)`` pairs) and reports how it changed since."""

    def __init__(self, sources: list[tuple[nn.Module, str]]):
        self.sources = sources
        self._state = [self._describe(_lookup(module, name)) for module, name in sources]
        _OPTIMIZER_STEPS.ensure_hooked()
        self._steps_seen_total = _OPTIMIZER_STEPS.total
        self._steps_seen: weakref.WeakKeyDictionary[Optimizer, int] = weakref.WeakKeyDictionary(
            _OPTIMIZER_STEPS.per_optimizer)

    def _optimizer_stepped(self) -> bool:
        """Whether an optimizer holding one of the watched parameters stepped since the last check."""
        if _OPTIMIZER_STEPS.total == self._steps_seen_total:
            return False
        self._steps_seen_total = _OPTIMIZER_STEPS.total
        watched = {id(state[0]) for state in self._state}
        return any(id(param) in watched for optimizer in _OPTIMIZER_STEPS.since(self._steps_seen)
                   for group in optimizer.param_groups for param in group["params"])

    @staticmethod
    def _describe(tensor: Any) -> tuple:
        """(the object itself, then what identifies its storage, then its version counter)."""
        if not isinstance(tensor, torch.Tensor):
            return (tensor, None)
        return (tensor, tensor.data_ptr(), tensor.dtype, tensor.device, tensor.shape, _version(tensor))

    def check(self) -> WeightChange:
        """How the tensors changed since the last call (or construction); remembers the new state."""
        change = WeightChange.VALUES if self._optimizer_stepped() else WeightChange.NONE
        for index, (module, name) in enumerate(self.sources):
            before = self._state[index]
            tensor = _lookup(module, name)
            if tensor is before[0] and (tensor is None or (tensor.data_ptr() == before[1]
                                                           and _version(tensor) == before[-1])):
                continue
            now = self._describe(tensor)
            self._state[index] = now
            if now[0] is not before[0] or now[1:-1] != before[1:-1]:
                return WeightChange.TENSORS
            change = WeightChange.VALUES
        return change
