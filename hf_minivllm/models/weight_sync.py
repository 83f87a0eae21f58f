"""Noticing that the HF model's weights changed since the decoder was built, cheaply, at every call.

Each tensor the decoder was built from (``DecoderForCausalLM.weight_sources``) is remembered by identity, data
pointer, version counter, dtype, device and shape. No weight is read or hashed:

- a new version counter only (optimizer steps, ``load_state_dict``, in-place edits under ``torch.no_grad``): the
  engine already computes with the new numbers (it shares the storage), only KV computed before is stale;
- anything else (a replaced parameter object, ``model.to(dtype/device)``, ``param.data = ...``, PEFT's safe merge),
  and new values of a buffer (the rotary ``inv_freq``, which the decoder turns into its own cos/sin table): the
  decoder must be rebuilt from the model. So must a change of ``state`` (PEFT: the adapters in use), when given.

Some updates bypass version counters: PyTorch's fused optimizers (``AdamW(fused=True)``, HF Trainer's default
``adamw_torch_fused``) and edits through ``param.data`` in place. Optimizer steps are caught by a process-wide
optimizer step hook that counts the steps of each optimizer; a step of an optimizer holding a watched parameter
counts as new values. ``param.data`` edits stay invisible; ``hf_minivllm.reset_prefix_cache`` covers them.
"""
from __future__ import annotations

import enum
import threading
import weakref
from collections.abc import Callable, Hashable
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

    def counts(self) -> tuple[int, dict[Optimizer, int]]:
        """The total and each optimizer's step count, read together."""
        with self.lock:
            return self.total, dict(self.per_optimizer)

    def since(self, seen: weakref.WeakKeyDictionary) -> dict[Optimizer, int]:
        """The optimizers that stepped since ``seen`` (optimizer -> count), with their counts now."""
        with self.lock:
            return {opt: count for opt, count in self.per_optimizer.items() if seen.get(opt) != count}


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


def _module_links(model: nn.Module, modules: list[nn.Module]) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, name, child)`` for every link on the paths from ``model`` down to each of ``modules``: a module
    replaced anywhere on such a path (``layer.self_attn.q_proj = ...``, an adapter wrapping a layer) breaks one."""
    parent_of: dict[int, tuple[nn.Module, str, nn.Module]] = {}
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is not None:
                parent_of.setdefault(id(child), (parent, name, child))
    links: dict[int, tuple[nn.Module, str, nn.Module]] = {}
    for module in modules:
        while id(module) in parent_of and id(module) not in links:
            links[id(module)] = parent_of[id(module)]
            module = parent_of[id(module)][0]
    return list(links.values())


class WeightSnapshot:
    """The version counters of a model's tensors and the optimizers' step counts, taken before a decoder is built
    from it: a ``WeightWatcher`` made after the build compares with these, so an edit made (by another thread) while
    the decoder was being built is seen, not taken as the state the decoder holds."""

    def __init__(self, model: nn.Module):
        _OPTIMIZER_STEPS.ensure_hooked()
        self.steps_total, self.steps = _OPTIMIZER_STEPS.counts()
        self.tensors = {id(tensor): (tensor, tensor.data_ptr(), _version(tensor))
                        for tensor in (*model.parameters(), *model.buffers())}

    def version_before(self, tensor: Any) -> int | None:
        """``tensor``'s version counter when the snapshot was taken; None if it is not the same tensor on the same
        storage (the build re-points the data of the parameters it fuses, whose values it copied)."""
        seen = self.tensors.get(id(tensor))
        if seen is None or seen[0] is not tensor or seen[1] != tensor.data_ptr():
            return None
        return seen[2]


class WeightWatcher:
    """Remembers the state of ``sources`` (``(module, attribute)`` pairs read from ``model``) and reports how it
    changed since; ``check`` looks, ``commit`` makes what it saw the new reference (once the change is handled).
    With ``since``, the reference is the model as it was when that snapshot was taken (before the build)."""

    def __init__(self, model: nn.Module, sources: list[tuple[nn.Module, str]],
                 state: Callable[[], Hashable] | None = None, since: WeightSnapshot | None = None):
        self.sources = sources
        self._read_state = state
        self._state_at_build = state() if state is not None else None
        self._links = _module_links(model, [module for module, _ in sources])
        self._state = [self._describe(_lookup(module, name)) for module, name in sources]
        if since is not None:
            for index, described in enumerate(self._state):
                before = since.version_before(described[0])
                if before is not None:
                    self._state[index] = (*described[:-1], before)
        # Buffers are read once into tables of the decoder's own (rotary cos/sin), never shared: new values rebuild.
        self._derived = frozenset(index for index, (module, name) in enumerate(sources) if name in module._buffers)
        self._watched = {id(state[0]) for state in self._state}
        _OPTIMIZER_STEPS.ensure_hooked()
        steps_total, steps = (since.steps_total, since.steps) if since is not None else _OPTIMIZER_STEPS.counts()
        self._steps_seen: weakref.WeakKeyDictionary[Optimizer, int] = weakref.WeakKeyDictionary(steps)
        self._steps_seen_total = steps_total
        self._seen_now: tuple[int, dict, dict] | None = None  # what the last check saw, for commit

    @staticmethod
    def _describe(tensor: Any) -> tuple:
        """(the object itself, then what identifies its storage, then its version counter)."""
        if not isinstance(tensor, torch.Tensor):
            return (tensor, None)
        return (tensor, tensor.data_ptr(), tensor.dtype, tensor.device, tensor.shape, _version(tensor))

    def check(self) -> WeightChange:
        """How the weights changed since the last ``commit`` (or construction)."""
        if any(parent._modules.get(name) is not child for parent, name, child in self._links):
            return WeightChange.TENSORS
        if self._read_state is not None and self._read_state() != self._state_at_build:
            return WeightChange.TENSORS
        total, stepped = _OPTIMIZER_STEPS.total, {}
        if total != self._steps_seen_total:
            stepped = _OPTIMIZER_STEPS.since(self._steps_seen)
        change = WeightChange.NONE
        if any(id(param) in self._watched for optimizer in stepped
               for group in optimizer.param_groups for param in group["params"]):
            change = WeightChange.VALUES
        states = {}
        for index, (module, name) in enumerate(self.sources):
            before = self._state[index]
            tensor = _lookup(module, name)
            if tensor is before[0] and (tensor is None or (tensor.data_ptr() == before[1]
                                                           and _version(tensor) == before[-1])):
                continue
            now = self._describe(tensor)
            if now[0] is not before[0] or now[1:-1] != before[1:-1] or index in self._derived:
                return WeightChange.TENSORS
            states[index] = now
            change = WeightChange.VALUES
        self._seen_now = (total, stepped, states)
        if change is WeightChange.NONE:
            self.commit()  # nothing to handle (an unrelated optimizer stepped, at most)
        return change

    def commit(self) -> None:
        """Take what the last ``check`` saw as the state to compare with from now on."""
        if self._seen_now is None:
            return
        total, stepped, states = self._seen_now
        self._steps_seen_total = total
        self._steps_seen.update(stepped)
        for index, state in states.items():
            self._state[index] = state
        self._seen_now = None
