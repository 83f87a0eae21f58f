"""``pipeline("text-generation")`` over an accelerated model: a list of prompts reaches the engine as one batch.

HF's ``TextGenerationPipeline`` runs ``preprocess -> forward -> postprocess`` per prompt (its default
``batch_size=1``), so without help every prompt would be its own ``generate`` call and the engine would never see a
batch. For a list input this module runs HF's own steps in two passes: the first runs ``forward`` for every prompt
but stops each at its ``model.generate`` call and keeps the call's arguments; all calls then run together through
``generate_many`` (each answered exactly as if made alone); the second pass runs ``forward`` again, ``generate``
now returning the stored result, and ``postprocess`` as usual. Everything the pipeline does around ``generate``
(chat templates, prefix handling, its generation config, reshaping, ``return_full_text``) stays HF's code.

Datasets, generators and single prompts keep HF's path (one accelerated ``generate`` call per prompt). The class
method is replaced once, at the first ``accelerate``; for models that are not accelerated it is HF's own.
"""
from __future__ import annotations

import copy
from typing import Any

from hf_minivllm.patches.generate import generate_many
from hf_minivllm.patches.state import generate_redirected, is_accelerated

_ORIGINAL = "_hf_minivllm_original"


class _GenerateCaptured(Exception):
    """Stops the first pass at ``model.generate``, once its arguments are recorded."""


def run_as_one_batch(
    pipe: Any, inputs: list[Any], preprocess_params: dict, forward_params: dict, postprocess_params: dict
) -> list[Any]:
    """The pipeline's outputs for ``inputs``, in order, with every ``generate`` call run in one engine batch."""
    model_inputs = [pipe.preprocess(item, **preprocess_params) for item in inputs]
    calls: list[tuple[tuple, dict[str, Any]]] = []

    def capture(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        raise _GenerateCaptured

    with generate_redirected(pipe.model, capture):
        for item in model_inputs:
            try:
                pipe.forward(copy.copy(item), **forward_params)
            except _GenerateCaptured:
                continue
            raise RuntimeError("TextGenerationPipeline.forward returned without calling model.generate")
    results = iter(generate_many(pipe.model, calls))
    with generate_redirected(pipe.model, lambda *args, **kwargs: next(results)):
        model_outputs = [pipe.forward(item, **forward_params) for item in model_inputs]
    return [pipe.postprocess(output, **postprocess_params) for output in model_outputs]


def install() -> None:
    """Make ``TextGenerationPipeline`` send a list input over an accelerated model to the engine as one batch."""
    from transformers.pipelines.text_generation import TextGenerationPipeline

    if hasattr(TextGenerationPipeline.get_iterator, _ORIGINAL):
        return
    original = TextGenerationPipeline.get_iterator

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        if is_accelerated(self.model) and isinstance(inputs, (list, tuple)) and len(inputs) > 1:
            return iter(run_as_one_batch(self, list(inputs), preprocess_params, forward_params, postprocess_params))
        return original(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params)

    setattr(get_iterator, _ORIGINAL, original)
    get_iterator.__doc__ = original.__doc__
    TextGenerationPipeline.get_iterator = get_iterator
