"""Noticing that the HF model's weights changed since the decoder was built, cheaply, at every call.

Each tensor the decoder was built from (``DecoderForCausalLM.weight_sources``) is remembered by identity, data
pointer, version counter, dtype, device and shape. No weight is read or hashed:

- a new version counter only (optimizer steps, ``load_state_dict``, in-place edits under ``torch.no_grad``): the
  engine already computes with the new numbers (it shares the storage), only KV computed before is stale;
- anything else (a replaced parameter object, ``model.to(dtype/device)``, ``param.data = ...``, PEFT's safe merge):
  the decoder must be rebuilt from the model.

Edits through ``param.data`` in place (``p.data.add_(...)``) bypass version counters by design and are invisible
here; ``hf_minivllm.reset_prefix_cache`` covers them.
"""
from __future__ import annotations

import enum
from typing import Any

import torch
from torch import nn


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

    @staticmethod
    def _describe(tensor: Any) -> tuple:
        """(the object itself, then what identifies its storage, then its version counter)."""
        if not isinstance(tensor, torch.Tensor):
            return (tensor, None)
        return (tensor, tensor.data_ptr(), tensor.dtype, tensor.device, tensor.shape, _version(tensor))

    def check(self) -> WeightChange:
        """How the tensors changed since the last call (or construction); remembers the new state."""
        change = WeightChange.NONE
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
