"""GenerationReplica: one engine in a Ray Data actor, mapping batches of prompts to their generations."""
from __future__ import annotations

import asyncio
import dataclasses
import reprlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

from hf_minivllm.llm import LLM
from hf_minivllm.sampling_params import SamplingParams

GENERATED_TEXT = "generated_text"
GENERATED_TOKEN_IDS = "generated_token_ids"
GENERATED_COLUMNS = (GENERATED_TEXT, GENERATED_TOKEN_IDS)

# How a row is shown in an error: every column, each value shortened (a row has no index in a Ray Dataset).
_ROW_REPR = reprlib.Repr()
_ROW_REPR.maxstring = _ROW_REPR.maxother = 60
_ROW_REPR.maxlist = 8


def check_columns(columns: Iterable[str], prompt_column: str, sampling_params_column: str | None) -> None:
    """Raise ValueError unless the named columns are there and no column would be overwritten by the generations."""
    columns = list(columns)
    for kind, column in (("prompt_column", prompt_column), ("sampling_params_column", sampling_params_column)):
        if column is not None and column not in columns:
            raise ValueError(f"{kind} {column!r} is not a column of the dataset; its columns: {columns}")
    taken = [column for column in GENERATED_COLUMNS if column in columns]
    if taken:
        raise ValueError(f"the dataset already has column(s) {taken}, which the generations would overwrite; "
                         "rename or drop them first")


class GenerationReplica:
    """For ``Dataset.map_batches(GenerationReplica, batch_format="pandas", ...)``: holds one ``LLM`` and adds
    ``generated_text`` and ``generated_token_ids`` columns to each batch, keeping every input column (a batch that
    has either column already is refused rather than overwritten).

    ``model`` is a model folder (or a name in the local Hugging Face cache); ``engine_config`` goes to ``LLM``.
    A prompt is a string or a list (array) of token ids; ``generated_text`` is None when the folder has no tokenizer.
    ``sampling_params_column`` names an optional column of per-row dicts of ``SamplingParams`` fields (such as
    ``{"max_tokens": 300}``) that override ``sampling_params`` for that row; None values are ignored.
    Every row is checked before the batch is generated: a bad one (a prompt that is empty, None or too long, bad
    sampling fields) fails the batch with a ValueError that shows that row's columns.
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
        check_columns(batch.columns, self.prompt_column, self.sampling_params_column)
        prompts, params = self._requests(batch)
        outputs = await asyncio.to_thread(self.llm.generate, prompts, params, use_tqdm=False)
        has_text = self.llm.tokenizer is not None
        batch = batch.assign(**{
            GENERATED_TEXT: [output["text"] if has_text else None for output in outputs],
            GENERATED_TOKEN_IDS: [output["token_ids"] for output in outputs],
        })
        if self.progress is not None:  # awaited: counted before the batch is handed back
            await self.progress.add.remote(len(outputs), sum(len(output["token_ids"]) for output in outputs))
        yield batch

    def _requests(self, batch: Any) -> tuple[list[list[int]], list[SamplingParams]]:
        """Every row's prompt as token ids and its sampling params, each checked as the engine will check it, so that
        a bad row fails with an error showing its columns (the engine's own names only its place in the batch)."""
        column = self.sampling_params_column
        overrides = batch[column] if column is not None else [None] * len(batch)
        prompts, params = [], []
        for row, (prompt, row_overrides) in enumerate(zip(batch[self.prompt_column], overrides)):
            try:
                token_ids = self._token_ids(prompt, row)
                row_params = self._row_params(row_overrides, row)
                self.llm.engine.validate_request(token_ids, row_params, row)
            except ValueError as error:
                raise ValueError(f"{error} (batch row {row}: {_shown_row(batch, row)})") from None
            prompts.append(token_ids)
            params.append(row_params)
        return prompts, params

    def _token_ids(self, prompt: Any, row: int) -> list[int]:
        """A prompt cell as token ids: a string encoded as ``LLM`` encodes it, or token ids (Arrow list columns arrive
        as lists or numpy arrays)."""
        if isinstance(prompt, str):
            if self.llm.tokenizer is None:
                raise ValueError(f"prompt {row} is a string but the model folder has no tokenizer; give token ids")
            return list(self.llm.tokenizer.encode(prompt))
        if hasattr(prompt, "tolist"):
            prompt = prompt.tolist()
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(token, int) for token in prompt):
            return list(prompt)
        raise ValueError(f"prompt {row} must be a string or a non-empty list of token ids, got {type(prompt).__name__}")

    def _row_params(self, overrides: Any, row: int) -> SamplingParams:
        if overrides is None:
            return self.sampling_params
        if not isinstance(overrides, dict):
            raise ValueError(f"{self.sampling_params_column} of prompt {row} must be a dict of SamplingParams "
                             f"fields, got {type(overrides).__name__}")
        # numpy scalars and arrays (from a pandas block) as the Python numbers and lists they hold
        fields = {name: value.tolist() if hasattr(value, "tolist") else value
                  for name, value in overrides.items() if value is not None}
        unknown = set(fields) - {field.name for field in dataclasses.fields(SamplingParams)}
        if unknown:
            raise ValueError(f"{self.sampling_params_column} of prompt {row} has unknown SamplingParams "
                             f"field(s) {sorted(unknown)}")
        return dataclasses.replace(self.sampling_params, **fields)


def _shown_row(batch: Any, row: int) -> str:
    """A row's columns, each value shortened (numpy values as the Python values they hold)."""
    values = {column: batch[column].iloc[row] for column in batch.columns}
    return ", ".join(f"{column}={_ROW_REPR.repr(value.tolist() if hasattr(value, 'tolist') else value)}"
                     for column, value in values.items())
