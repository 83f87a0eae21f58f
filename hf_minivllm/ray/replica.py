"""GenerationReplica: one engine in a Ray Data actor, mapping batches of prompts to their generations."""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from hf_minivllm.llm import LLM
from hf_minivllm.sampling_params import SamplingParams

GENERATED_TEXT = "generated_text"
GENERATED_TOKEN_IDS = "generated_token_ids"


class GenerationReplica:
    """For ``Dataset.map_batches(GenerationReplica, batch_format="pandas", ...)``: holds one ``LLM`` and adds
    ``generated_text`` and ``generated_token_ids`` columns to each batch, keeping every input column.

    ``model`` is a model folder (or a name in the local Hugging Face cache); ``engine_config`` goes to ``LLM``.
    A prompt is a string or a list (array) of token ids; ``generated_text`` is None when the folder has no tokenizer.
    ``sampling_params_column`` names an optional column of per-row dicts of ``SamplingParams`` fields (such as
    ``{"max_tokens": 300}``) that override ``sampling_params`` for that row; None values are ignored.
    ``__call__`` is asynchronous: given an actor pool that runs several calls per actor (``replica_pool``), one
    replica serves several batches at once and their requests join one continuous batch, so the engine never drains
    between batches. ``progress`` is an optional actor with an ``add(rows, output_tokens)`` method, told after each
    batch.

    Example::

        ds.map_batches(GenerationReplica, fn_constructor_kwargs={"model": path}, batch_size=64,
                       batch_format="pandas", compute=replica_pool(2, 64, {}), num_gpus=1)
    """

    def __init__(
        self,
        model: str,
        sampling_params: SamplingParams | None = None,
        prompt_column: str = "prompt",
        sampling_params_column: str | None = None,
        progress: Any = None,
        **engine_config: Any,
    ):
        if sampling_params is not None and not isinstance(sampling_params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams or None, got {type(sampling_params).__name__}")
        self.sampling_params = sampling_params if sampling_params is not None else SamplingParams()
        self.prompt_column = prompt_column
        self.sampling_params_column = sampling_params_column
        self.progress = progress
        self.llm = LLM(model, **engine_config)

    async def __call__(self, batch: Any) -> AsyncIterator[Any]:
        for kind, column in (("prompt_column", self.prompt_column),
                             ("sampling_params_column", self.sampling_params_column)):
            if column is not None and column not in batch.columns:
                raise ValueError(f"{kind} {column!r} is not a column of the dataset; its columns: {list(batch.columns)}")
        prompts = [_prompt(value, row) for row, value in enumerate(batch[self.prompt_column])]
        params = self.sampling_params
        if self.sampling_params_column is not None:
            params = [self._row_params(value, row) for row, value in enumerate(batch[self.sampling_params_column])]
        outputs = await asyncio.to_thread(self.llm.generate, prompts, params, use_tqdm=False)
        has_text = self.llm.tokenizer is not None
        batch = batch.assign(**{
            GENERATED_TEXT: [output["text"] if has_text else None for output in outputs],
            GENERATED_TOKEN_IDS: [output["token_ids"] for output in outputs],
        })
        if self.progress is not None:  # awaited: counted before the batch is handed back
            await self.progress.add.remote(len(outputs), sum(len(output["token_ids"]) for output in outputs))
        yield batch

    def _row_params(self, overrides: Any, row: int) -> SamplingParams:
        if overrides is None:
            return self.sampling_params
        if not isinstance(overrides, dict):
            raise ValueError(f"{self.sampling_params_column} in batch row {row} must be a dict of SamplingParams "
                             f"fields, got {type(overrides).__name__}")
        fields = {name: value for name, value in overrides.items() if value is not None}
        unknown = set(fields) - {field.name for field in dataclasses.fields(SamplingParams)}
        if unknown:
            raise ValueError(f"{self.sampling_params_column} in batch row {row} has unknown SamplingParams "
                             f"field(s) {sorted(unknown)}")
        return dataclasses.replace(self.sampling_params, **fields)


def _prompt(value: Any, row: int) -> str | list[int]:
    """A dataset cell as an LLM prompt: a string, or token ids (Arrow list columns arrive as numpy arrays)."""
    if isinstance(value, str):
        return value
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)) and value and all(isinstance(token, int) for token in value):
        return list(value)
    raise ValueError(f"prompt in batch row {row} must be a string or a non-empty list of token ids, "
                     f"got {type(value).__name__}")
