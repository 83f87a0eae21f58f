"""hf_minivllm.ray on a local Ray cluster: data-parallel replicas equal one LLM.generate, columns kept (none
overwritten), a bad row named, replicas that fit the cluster, no replica left behind after a call, failed or not."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import ray
import ray.data

import hf_minivllm.ray as hf_ray
from conftest import SMALL_ENGINE, tiny_model
from hf_minivllm import LLM, SamplingParams

ENGINE = dict(SMALL_ENGINE, max_model_len=256)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SHORT_ENGINE = dict(SMALL_ENGINE, max_model_len=32)
SHORT_GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Qwen3 saved without tokenizer files (token-id prompts only)."""
    folder = tmp_path_factory.mktemp("tiny-qwen3")
    tiny_model("qwen3").save_pretrained(folder)
    return str(folder)


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(rng.randint(3, 40))] for _ in range(count)]


def _by_id(dataset: ray.data.Dataset) -> dict[int, dict]:
    return {row["id"]: row for row in dataset.take_all()}


def _all_cpus_free_within(seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]:
            return True
        time.sleep(0.2)
    return False


def _no_replicas(*args, **kwargs):
    raise AssertionError("replicas were started")


def _run(replica, batch: pd.DataFrame) -> pd.DataFrame:
    """One batch through a replica in this process (no actor)."""
    async def first_output():
        async for output in replica(batch):
            return output

    return asyncio.run(first_output())


def test_two_replicas_equal_one_llm_generate_on_token_ids_and_keep_columns(local_ray, tiny_folder):
    prompts = _prompts(64)
    dataset = ray.data.from_items([{"id": i, "prompt": p, "source": f"doc-{i}"} for i, p in enumerate(prompts)])
    result = hf_ray.generate(dataset, tiny_folder, sampling_params=GREEDY, num_replicas=2, batch_size=8,
                             use_tqdm=False, **ENGINE)
    expected = LLM(tiny_folder, **ENGINE).generate(prompts, GREEDY, use_tqdm=False)
    rows = _by_id(result)
    assert sorted(rows) == list(range(64))
    assert set(result.columns()) == {"id", "prompt", "source", "generated_text", "generated_token_ids"}
    for i, row in rows.items():
        assert list(row["prompt"]) == prompts[i] and row["source"] == f"doc-{i}"
        assert list(row["generated_token_ids"]) == expected[i]["token_ids"] and len(expected[i]["token_ids"]) == 12
        assert row["generated_text"] is None  # the folder has no tokenizer
    assert _all_cpus_free_within(20), "a replica outlived its call"


def _word_tokenizer(words: list[str]):
    """A small word-level tokenizer (ids 0..3 special), built in memory: no download, no slow GGUF parsing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def test_one_replica_on_string_prompts_with_per_row_params_equals_llm(local_ray, tmp_path):
    folder = str(tmp_path / "tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    _word_tokenizer([f"w{i}" for i in range(316)]).save_pretrained(folder)
    prompts = [" ".join(f"w{t}" for t in p) for p in _prompts(64, seed=1)]
    max_tokens = [4 + i % 9 for i in range(64)]
    dataset = ray.data.from_items([{"id": i, "text": p, "params": {"max_tokens": max_tokens[i]}}
                                   for i, p in enumerate(prompts)])
    result = hf_ray.generate(dataset, folder, sampling_params=GREEDY, prompt_column="text",
                             sampling_params_column="params", num_replicas=1, batch_size=16, use_tqdm=False, **ENGINE)
    params = [dataclasses.replace(GREEDY, max_tokens=n) for n in max_tokens]
    expected = LLM(folder, **ENGINE).generate(prompts, params, use_tqdm=False)
    rows = _by_id(result)
    assert sorted(rows) == list(range(64))
    for i, row in rows.items():
        assert row["text"] == prompts[i] and row["params"] == {"max_tokens": max_tokens[i]}
        assert list(row["generated_token_ids"]) == expected[i]["token_ids"]
        assert len(expected[i]["token_ids"]) == max_tokens[i]
        assert row["generated_text"] == expected[i]["text"] and row["generated_text"].startswith("w")


def test_llm_from_a_folder_without_tokenizer_takes_token_ids(tiny_folder):
    llm = LLM(tiny_folder, **ENGINE)
    assert llm.tokenizer is None
    assert len(llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0]["token_ids"]) == 12
    with pytest.raises(ValueError, match="prompt 0 is a string but this LLM has no tokenizer"):
        llm.generate(["hello"], GREEDY, use_tqdm=False)


def test_bad_arguments_raise_before_any_replica_starts(local_ray, tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(ray.data.Dataset, "map_batches", _no_replicas)
    dataset = ray.data.from_items([{"prompt": [5, 6, 7]}])
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        hf_ray.generate(dataset, missing)
    with pytest.raises(ValueError, match="prompt_column 'text'"):
        hf_ray.generate(dataset, tiny_folder, prompt_column="text")
    with pytest.raises(ValueError, match="num_replicas must be a positive integer"):
        hf_ray.generate(dataset, tiny_folder, num_replicas=0)
    with pytest.raises(ValueError, match="max_num_seqs"):
        hf_ray.generate(dataset, tiny_folder, max_num_seqs=-1)
    with pytest.raises(ValueError, match="sampling_params_column 'params'"):
        hf_ray.generate(dataset, tiny_folder, sampling_params_column="params")
    with pytest.raises(ValueError, match="unknown engine config"):
        hf_ray.generate(dataset, tiny_folder, max_num_sequences=4)


def test_a_bad_row_fails_the_call_naming_it_and_leaves_no_replica_behind(local_ray, tiny_folder):
    """The third row is too long for the model: the call fails with the replica's error, which names the row, and
    ends its replicas even while the caller keeps the error (as pytest or a notebook keeps it)."""
    dataset = ray.data.from_items([{"id": f"doc-{i}", "prompt": list(range(3, 8 + 40 * (i == 2)))} for i in range(4)])
    started = time.monotonic()
    with pytest.raises(Exception) as error:
        hf_ray.generate(dataset, tiny_folder, sampling_params=SHORT_GREEDY, batch_size=2, use_tqdm=False,
                        **SHORT_ENGINE)
    assert time.monotonic() - started < 120
    assert "'doc-2'" in str(error.value) and "45 tokens; max_model_len=32" in str(error.value)
    assert _all_cpus_free_within(20)


def test_nothing_but_hf_minivllm_ray_imports_ray():
    code = ("import sys, hf_minivllm, hf_minivllm.serve.app, hf_minivllm.serve.cli, hf_minivllm.patches; "
            "assert 'ray' not in sys.modules, 'ray was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_replica_serves_several_batches_at_once(local_ray, tiny_folder):
    """A replica's batches overlap (its __call__ is async and Ray Data may run several at once), so the engine's
    continuous batch holds more than one batch of rows: it never drains between batches."""

    class CountsOverlap(hf_ray.GenerationReplica):
        active = peak = 0

        async def __call__(self, batch):
            CountsOverlap.active += 1
            CountsOverlap.peak = max(CountsOverlap.peak, CountsOverlap.active)
            async for out in super().__call__(batch):
                CountsOverlap.active -= 1
                yield out.assign(peak_batches_in_flight=CountsOverlap.peak)

    dataset = ray.data.from_items([{"prompt": p} for p in _prompts(48, seed=2)])
    result = dataset.map_batches(CountsOverlap, fn_constructor_kwargs=dict(model=tiny_folder, sampling_params=GREEDY,
                                                                          **ENGINE),
                                 batch_size=4, batch_format="pandas", compute=hf_ray.replica_pool(1, 4, ENGINE))
    assert max(row["peak_batches_in_flight"] for row in result.take_all()) > 1


def test_a_replica_whose_process_dies_is_restarted_and_its_batch_retried(local_ray, tiny_folder, tmp_path):
    """The replica's process exits on its first batch (as an out-of-memory kill would end it): Ray restarts the
    actor and retries the batch, and every row comes back with the answer one engine gives."""
    died = tmp_path / "died"

    class DiesOnce(hf_ray.GenerationReplica):
        async def __call__(self, batch):
            if not died.exists():
                died.touch()
                os._exit(1)
            async for out in super().__call__(batch):
                yield out

    prompts = _prompts(8, seed=5)
    dataset = ray.data.from_items([{"id": i, "prompt": p} for i, p in enumerate(prompts)])
    result = dataset.map_batches(DiesOnce, fn_constructor_kwargs=dict(model=tiny_folder, sampling_params=GREEDY,
                                                                      **ENGINE),
                                 batch_size=4, batch_format="pandas", compute=hf_ray.replica_pool(1, 4, ENGINE),
                                 max_restarts=1, max_task_retries=1)
    rows = _by_id(result)
    assert died.exists()
    expected = [out["token_ids"] for out in LLM(tiny_folder, **ENGINE).generate(prompts, GREEDY, use_tqdm=False)]
    assert [list(rows[i]["generated_token_ids"]) for i in range(len(prompts))] == expected


def test_generate_bounds_replica_restarts_and_batch_retries(local_ray, tiny_folder, monkeypatch):
    """Ray Data restarts a dead actor and retries its batch without end by default: a replica that died on every
    batch would keep the call from ever returning. generate bounds both."""
    seen = {}

    class Recorded(Exception):
        pass

    def record(dataset, fn, **kwargs):
        seen.update(kwargs)
        raise Recorded  # before any replica starts

    monkeypatch.setattr(ray.data.Dataset, "map_batches", record)
    with pytest.raises(Recorded):
        hf_ray.generate(ray.data.from_items([{"prompt": [5, 6]}]), tiny_folder, use_tqdm=False, **ENGINE)
    assert 0 < seen["max_restarts"] < 10 and 0 < seen["max_task_retries"] < 10


@pytest.fixture(scope="module")
def replica(tiny_folder):
    """A GenerationReplica in this process (no actor), for what a replica does with one batch."""
    return hf_ray.GenerationReplica(tiny_folder, sampling_params=SHORT_GREEDY, sampling_params_column="params",
                                    **SHORT_ENGINE)


def test_a_dataset_with_a_generated_column_is_refused_before_any_replica_starts(local_ray, tiny_folder, monkeypatch):
    monkeypatch.setattr(ray.data.Dataset, "map_batches", _no_replicas)
    for column in ("generated_text", "generated_token_ids"):
        dataset = ray.data.from_items([{"prompt": [5, 6, 7], column: "the user's own data"}])
        with pytest.raises(ValueError, match=f"already has .*{column}"):
            hf_ray.generate(dataset, tiny_folder, use_tqdm=False, **SHORT_ENGINE)


def test_a_replica_refuses_a_batch_that_already_has_a_generated_column(replica):
    batch = pd.DataFrame({"prompt": [[5, 6, 7]], "params": [None], "generated_text": ["the user's own data"]})
    with pytest.raises(ValueError, match="already has .*generated_text"):
        _run(replica, batch)


@pytest.mark.parametrize("bad_prompt, reason", [
    (list(range(3, 40)), "37 tokens; max_model_len=32"),
    ([], "non-empty list of token ids"),
    (None, "got NoneType"),
    ("a string", "no tokenizer"),
])
def test_a_bad_row_fails_the_batch_with_an_error_naming_that_row(replica, bad_prompt, reason):
    batch = pd.DataFrame({"id": ["doc-0", "doc-1", "doc-2"], "prompt": [[5, 6], bad_prompt, [7, 8]],
                          "params": [None, None, None]})
    with pytest.raises(ValueError, match=reason) as error:
        _run(replica, batch)
    assert "'doc-1'" in str(error.value) and "batch row 1" in str(error.value)


def test_numpy_values_in_per_row_sampling_params_equal_python_values(replica, tiny_folder):
    """A pandas block keeps the objects it was given: numpy scalars and arrays count as the numbers they hold."""
    prompts = [[5, 6, 7], [8, 9]]
    overrides = {"max_tokens": np.int64(3), "stop_token_ids": np.array([1, 2])}
    result = _run(replica, pd.DataFrame({"prompt": [np.array(p) for p in prompts], "params": [None, overrides]}))
    params = [SHORT_GREEDY, dataclasses.replace(SHORT_GREEDY, max_tokens=3, stop_token_ids=[1, 2])]
    expected = LLM(tiny_folder, **SHORT_ENGINE).generate(prompts, params, use_tqdm=False)
    assert [list(ids) for ids in result["generated_token_ids"]] == [out["token_ids"] for out in expected]


class _Recorded(Exception):
    """Raised by a stand-in for Dataset.map_batches, after recording its arguments: no replica starts."""


@pytest.fixture
def map_batches_arguments(monkeypatch) -> dict:
    seen = {}

    def record(dataset, fn, **kwargs):
        seen.update(kwargs)
        raise _Recorded

    monkeypatch.setattr(ray.data.Dataset, "map_batches", record)
    return seen


def test_replicas_ask_for_their_tensor_parallel_gpus_only_where_one_node_has_them(local_ray, tiny_folder,
                                                                                  map_batches_arguments, monkeypatch):
    """A replica asking for more GPUs than any node has would wait for them for ever: refused before it starts."""

    def cluster_of(gpus_per_node: list[int]):
        nodes = [{"Alive": True, "Resources": {"CPU": 4.0, "GPU": float(gpus)}} for gpus in gpus_per_node]
        totals = {"CPU": 4.0 * len(nodes), "GPU": float(sum(gpus_per_node))}
        monkeypatch.setattr(ray, "nodes", lambda: nodes)
        monkeypatch.setattr(ray, "cluster_resources", lambda: totals)

    dataset = ray.data.from_items([{"prompt": [5, 6, 7]}])
    cluster_of([1, 1])
    with pytest.raises(ValueError, match="tensor_parallel_size=2 .* 1 GPU"):
        hf_ray.generate(dataset, tiny_folder, use_tqdm=False, tensor_parallel_size=2, **SHORT_ENGINE)
    assert not map_batches_arguments
    cluster_of([1, 2])
    with pytest.raises(_Recorded):
        hf_ray.generate(dataset, tiny_folder, use_tqdm=False, tensor_parallel_size=2, **SHORT_ENGINE)
    assert map_batches_arguments["num_gpus"] == 2


def test_replicas_that_would_take_every_cpu_are_refused_before_they_start(local_ray, tiny_folder,
                                                                         map_batches_arguments):
    """Replicas holding all of the cluster's CPUs leave none for the tasks reading the dataset: Ray Data would wait
    for ever. The local cluster has 4 CPUs."""
    dataset = ray.data.from_items([{"prompt": [5, 6, 7]}])
    with pytest.raises(ValueError, match="num_replicas=4: .* all 4 of this Ray cluster's"):
        hf_ray.generate(dataset, tiny_folder, num_replicas=4, use_tqdm=False, **SHORT_ENGINE)
    with pytest.raises(_Recorded):
        hf_ray.generate(dataset, tiny_folder, num_replicas=3, use_tqdm=False, **SHORT_ENGINE)
    assert map_batches_arguments["compute"].max_size == 3
