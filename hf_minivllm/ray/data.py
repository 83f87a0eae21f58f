"""``generate``: a Ray Dataset of prompts through ``num_replicas`` engine replicas (Ray Data actors)."""
from __future__ import annotations

import threading
from typing import Any

import ray
import ray.data
from tqdm.auto import tqdm

from hf_minivllm.config import Config
from hf_minivllm.models.loading import resolve_model_folder
from hf_minivllm.ray.replica import GenerationReplica
from hf_minivllm.sampling_params import SamplingParams

# Rows per batch handed to a replica. A replica is given enough batches at once to fill its engine's continuous
# batch (max_num_seqs requests; its __call__ is async, so their requests join one batch); small batches spread the
# rows evenly over replicas that became ready at different times.
DEFAULT_BATCH_SIZE = 64
_PROGRESS_REFRESH_S = 0.5
# Ray's fault tolerance, bounded: a replica whose process dies is restarted and its batches retried, up to these
# counts. Ray Data's defaults are unbounded, so a replica that died on every batch (a prompt that always runs it out
# of memory) would restart for ever and the call would never return.
REPLICA_MAX_RESTARTS = 4
BATCH_MAX_RETRIES = 4


@ray.remote(num_cpus=0)
class _ProgressCounter:
    """Rows and output tokens the replicas finished: told by each replica after each batch, read by the driver."""

    def __init__(self) -> None:
        self.rows = 0
        self.output_tokens = 0

    def add(self, rows: int, output_tokens: int) -> None:
        self.rows += rows
        self.output_tokens += output_tokens

    def totals(self) -> tuple[int, int]:
        return self.rows, self.output_tokens


class _ProgressBar:
    """A tqdm bar of rows done and output tokens per second, refreshed from the counter by a driver thread."""

    def __init__(self, counter: Any):
        self.counter = counter
        self.done = threading.Event()
        self.bar = tqdm(desc="Generating", unit=" rows", dynamic_ncols=True)
        self.thread = threading.Thread(target=self._refresh, name="hf-minivllm-ray-progress", daemon=True)

    def __enter__(self) -> _ProgressBar:
        self.thread.start()
        return self

    def _show(self) -> None:
        rows, tokens = ray.get(self.counter.totals.remote())
        elapsed = max(self.bar.format_dict["elapsed"], 1e-9)
        self.bar.set_postfix(output=f"{tokens / elapsed:,.0f} tok/s", refresh=False)
        self.bar.update(rows - self.bar.n)

    def _refresh(self) -> None:
        while not self.done.wait(_PROGRESS_REFRESH_S):
            self._show()

    def __exit__(self, *exc_info: Any) -> None:
        self.done.set()
        self.thread.join()
        if exc_info[0] is None:
            self._show()
        self.bar.close()


def replica_pool(num_replicas: int, batch_size: int, engine_config: dict[str, Any]) -> ray.data.ActorPoolStrategy:
    """``num_replicas`` actors, each running as many batches at once as its engine runs sequences
    (``max_num_seqs``), so a replica's continuous batch stays full across batch boundaries (Ray Data runs one call
    per actor at a time unless told otherwise, async calls included)."""
    in_flight = -(-Config(**engine_config).max_num_seqs // batch_size)
    return ray.data.ActorPoolStrategy(size=num_replicas, max_tasks_in_flight_per_actor=in_flight,
                                      max_concurrent_calls_per_actor=in_flight)


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def generate(
    dataset: ray.data.Dataset,
    model: str,
    *,
    sampling_params: SamplingParams | None = None,
    num_replicas: int = 1,
    prompt_column: str = "prompt",
    sampling_params_column: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    use_tqdm: bool = True,
    **engine_config: Any,
) -> ray.data.Dataset:
    """Generate for every row of ``dataset``; returns a (materialized) Dataset with every input column plus
    ``generated_text`` (None when the model folder has no tokenizer) and ``generated_token_ids``.

    ``dataset[prompt_column]`` holds strings or lists of token ids; ``dataset[sampling_params_column]``, when
    named, per-row dicts of ``SamplingParams`` fields that override ``sampling_params`` (e.g. ``max_tokens``).
    ``model`` is a folder every node can read (or a name in the local Hugging Face cache of this process's machine
    and of every node). Each of the ``num_replicas`` replicas is a Ray Data actor with
    one engine (``engine_config`` as for ``LLM``) and, on a cluster with GPUs, ``tensor_parallel_size`` GPUs of one
    node. Row order is not kept across batches: carry an id column to join on. A replica whose process dies is
    restarted by Ray and its batches retried (up to ``REPLICA_MAX_RESTARTS`` restarts per replica and
    ``BATCH_MAX_RETRIES`` retries per batch; past them the call raises Ray's error); an exception in a replica fails
    the call with that exception.
    """
    if not isinstance(dataset, ray.data.Dataset):
        raise ValueError(f"dataset must be a ray.data.Dataset, got {type(dataset).__name__}")
    if not isinstance(model, str):
        raise ValueError(f"model must be a model folder (str), got {type(model).__name__}")
    _positive_int("num_replicas", num_replicas)
    _positive_int("batch_size", batch_size)
    if sampling_params is not None and not isinstance(sampling_params, SamplingParams):
        raise ValueError(f"sampling_params must be a SamplingParams or None, got {type(sampling_params).__name__}")
    unknown = set(engine_config) - set(Config.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown engine config argument(s) {sorted(unknown)}; valid: {sorted(Config.__dataclass_fields__)}")
    config = Config(model=model, **engine_config)
    resolve_model_folder(model)
    columns = dataset.columns()
    for kind, column in (("prompt_column", prompt_column), ("sampling_params_column", sampling_params_column)):
        if columns is not None and column is not None and column not in columns:
            raise ValueError(f"{kind} {column!r} is not a column of the dataset; its columns: {columns}")
    if not ray.is_initialized():
        ray.init()
    gpus_per_replica = config.tensor_parallel_size if ray.cluster_resources().get("GPU", 0) > 0 else 0
    counter = _ProgressCounter.remote()
    try:
        generated = dataset.map_batches(
            GenerationReplica,
            fn_constructor_kwargs=dict(model=model, sampling_params=sampling_params, prompt_column=prompt_column,
                                       sampling_params_column=sampling_params_column, progress=counter,
                                       **engine_config),
            batch_size=batch_size,
            batch_format="pandas",
            compute=replica_pool(num_replicas, batch_size, engine_config),
            num_gpus=gpus_per_replica,
            max_restarts=REPLICA_MAX_RESTARTS,
            max_task_retries=BATCH_MAX_RETRIES,
        )
        if not use_tqdm:
            return generated.materialize()
        with _ProgressBar(counter):
            return generated.materialize()
    finally:
        ray.kill(counter)
