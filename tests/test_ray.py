"""hf_minivllm.ray on a local Ray cluster: data-parallel replicas equal one LLM.generate, columns kept, errors."""
from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
import time

import pytest
import ray
import ray.data

import hf_minivllm.ray as hf_ray
from conftest import SMALL_ENGINE, tiny_model
from hf_minivllm import LLM, SamplingParams

ENGINE = dict(SMALL_ENGINE, max_model_len=256)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


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
    def no_replicas(*args, **kwargs):
        raise AssertionError("replicas were started")

    monkeypatch.setattr(ray.data.Dataset, "map_batches", no_replicas)
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


def test_an_error_in_a_replica_fails_the_call_with_its_cause(local_ray, tiny_folder):
    dataset = ray.data.from_items([{"prompt": "a string, but the folder has no tokenizer"}])
    started = time.monotonic()
    with pytest.raises(Exception, match="no tokenizer"):
        hf_ray.generate(dataset, tiny_folder, use_tqdm=False, **ENGINE)
    assert time.monotonic() - started < 120


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
