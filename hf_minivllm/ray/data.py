"""``generate``: a Ray Dataset of prompts through ``num_replicas`` engine replicas (Ray Data actors)."""
from __future__ import annotations

import threading
from typing import Any

import ray
import ray.data
from tqdm.auto import tqdm

from hf_minivllm.config import Config
from hf_minivllm.models.loading import resolve_model_folder
from hf_minivllm.ray.replica import GenerationReplica, check_columns
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
class _CallTracker:
    """What one call's replicas report: the rows and output tokens they finished (after each batch, for the progress
    bar) and their own actor handles (each replica's on start), so that a failed call can end them. Ray Data leaves a
    failed pool's actors to reference counting, and the error handed to the caller refers to them until it is
    dropped and collected: without this, a replica would hold its GPUs for as long as the caller (a notebook, say)
    keeps the error."""

    def __init__(self) -> None:
        self.rows = 0
        self.output_tokens = 0
        self.replicas: list[Any] = []

    def add(self, rows: int, output_tokens: int) -> None:
        self.rows += rows
        self.output_tokens += output_tokens

    def totals(self) -> tuple[int, int]:
        return self.rows, self.output_tokens

    def register(self, replica: Any) -> None:
        self.replicas.append(replica)

    def registered(self) -> list[Any]:
        return self.replicas


class _TrackedReplica(GenerationReplica):
    """A GenerationReplica that registers its actor with the call's tracker before loading its model."""

    def __init__(self, tracker: Any, **replica_config: Any):
        ray.get(tracker.register.remote(ray.get_runtime_context().current_actor))
        super().__init__(progress=tracker, **replica_config)


class _ProgressBar:
    """A tqdm bar of rows done and output tokens per second, refreshed from the tracker by a driver thread."""

    def __init__(self, tracker: Any):
        self.tracker = tracker
        self.done = threading.Event()
        self.bar = tqdm(desc="Generating", unit=" rows", dynamic_ncols=True)
        self.thread = threading.Thread(target=self._refresh, name="hf-minivllm-ray-progress", daemon=True)

    def __enter__(self) -> _ProgressBar:
        self.thread.start()
        return self

    def _show(self) -> None:
        rows, tokens = ray.get(self.tracker.totals.remote())
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


def _gpus_per_replica(num_replicas: int, tensor_parallel_size: int) -> int:
    """GPUs each replica asks Ray for: its tensor-parallel group's, all on one node (none on a cluster without GPUs),
    besides the one CPU Ray Data gives each actor. Raises ValueError where Ray would keep the call waiting for ever:
    no node has that many GPUs, or the replicas that can start take every CPU of the cluster, leaving none for the
    tasks that read the dataset (nodes as they are now; a cluster that has none yet is left to its autoscaler)."""
    node_gpus = [node["Resources"].get("GPU", 0) for node in ray.nodes() if node["Alive"]]
    gpus = tensor_parallel_size if max(node_gpus, default=0) > 0 else 0
    if gpus and max(node_gpus) < gpus:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} needs that many GPUs of one node for each "
                         f"replica, but the largest node of this Ray cluster has {max(node_gpus):g} GPU(s)")
    startable = min(num_replicas, sum(int(count // gpus) for count in node_gpus)) if gpus else num_replicas
    cpus = ray.cluster_resources().get("CPU", 0)
    if 0 < cpus <= startable:
        raise ValueError(f"num_replicas={num_replicas}: the {startable} replica(s) that can run at once take one CPU "
                         f"each, all {cpus:g} of this Ray cluster's, leaving none to read the dataset (Ray Data would "
                         "wait for ever); use fewer replicas")
    return gpus


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
    ``generated_text`` (None when the model folder has no tokenizer) and ``generated_token_ids`` (a dataset that has
    either column already is refused).

    ``dataset[prompt_column]`` holds strings or lists of token ids; ``dataset[sampling_params_column]``, when
    named, per-row dicts of ``SamplingParams`` fields that override ``sampling_params`` (e.g. ``max_tokens``).
    ``model`` is a folder every node can read (or a name in the local Hugging Face cache of this process's machine
    and of every node). Each of the ``num_replicas`` replicas is a Ray Data actor with
    one engine (``engine_config`` as for ``LLM``) and, on a cluster with GPUs, ``tensor_parallel_size`` GPUs of one
    node. Row order is not kept across batches: carry an id column to join on. A replica whose process dies is
    restarted by Ray and its batches retried (up to ``REPLICA_MAX_RESTARTS`` restarts per replica and
    ``BATCH_MAX_RETRIES`` retries per batch; past them the call raises Ray's error); an exception in a replica (a
    bad row: its error shows the row's columns) fails the call with that exception. A failed call ends its replicas.
    """
    if not isinstance(dataset, ray.data.Dataset):
        raise ValueError(f"dataset must be a ray.data.Dataset, got {type(dataset).__name__}")
    if not isinstance(model, str):
        raise ValueError(f"model must be a model folder (str), got {type(model).__name__}")
    _positive_int("num_replicas", num_replicas)
    _positive_int("batch_size", batch_size)
    if not isinstance(prompt_column, str):
        raise ValueError(f"prompt_column must be a column name (str), got {type(prompt_column).__name__}")
    if sampling_params_column is not None and not isinstance(sampling_params_column, str):
        raise ValueError(f"sampling_params_column must be a column name (str) or None, "
                         f"got {type(sampling_params_column).__name__}")
    if sampling_params is not None and not isinstance(sampling_params, SamplingParams):
        raise ValueError(f"sampling_params must be a SamplingParams or None, got {type(sampling_params).__name__}")
    unknown = set(engine_config) - set(Config.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown engine config argument(s) {sorted(unknown)}; "
                         f"valid: {sorted(Config.__dataclass_fields__)}")
    config = Config(model=model, **engine_config)
    resolve_model_folder(model)
    columns = dataset.columns()
    if columns is not None:
        check_columns(columns, prompt_column, sampling_params_column)
    if not ray.is_initialized():
        ray.init()
    gpus_per_replica = _gpus_per_replica(num_replicas, config.tensor_parallel_size)
    tracker = _CallTracker.remote()
    try:
        generated = dataset.map_batches(
            _TrackedReplica,
            fn_constructor_kwargs=dict(tracker=tracker, model=model, sampling_params=sampling_params,
                                       prompt_column=prompt_column, sampling_params_column=sampling_params_column,
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
        with _ProgressBar(tracker):
            return generated.materialize()
    except BaseException:
        for replica in ray.get(tracker.registered.remote()):
            ray.kill(replica)
        raise
    finally:
        ray.kill(tracker)
