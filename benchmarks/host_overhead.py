"""Where the host's time goes in an engine step: wall time of each part of ``LLMEngine.step``, per step.

Qwen3-0.6B architecture (random bf16) on CUDA, decode steps at batch 1 (greedy, W2-like, eos held off with
``min_tokens``) and batch 256 (W1's temperature 0.6), with async scheduling on and off. ``wait`` is the time the host
blocks on a step's tokens: with async scheduling it is the device time the host's work did not cover. Writes the
table to --out as JSON as well.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

from hf_minivllm import LLM, SamplingParams
from hf_minivllm.engine import model_runner
from workloads import commit, random_model


class PartTimer:
    """Wraps named callables so every call adds its wall time to ``totals[name]``."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self._restore: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.totals[name] += time.perf_counter() - start

        self._restore.append((owner, attribute, original))
        setattr(owner, attribute, timed)

    def restore(self) -> None:
        for owner, attribute, original in reversed(self._restore):
            setattr(owner, attribute, original)
        self._restore.clear()


def breakdown(llm: LLM, batch: int, params: SamplingParams, context: int = 1024 - 64) -> dict[str, float]:
    engine, runner = llm.engine, llm.engine.runner
    prompts = [[(7 * i + j) % 10000 for j in range(context if batch > 1 else 128)] for i in range(batch)]
    for prompt in prompts:
        engine.add_request(prompt, params)
    engine.step()  # prefill
    timer = PartTimer()
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(runner, "_prepare_decode", "prepare_decode")
    timer.wrap(runner, "_sampling_tensors", "sampling_tensors")
    timer.wrap(runner, "_suppress_stop_tokens", "suppress_stop_tokens")
    if runner.graphs is not None:
        timer.wrap(runner.graphs, "run", "graph_inputs_and_replay")
    timer.wrap(model_runner, "sample", "sample")
    timer.wrap(model_runner.LaunchedStep, "__init__", "copy_tokens_to_host")
    timer.wrap(model_runner.LaunchedStep, "token_ids", "wait_and_read_tokens")
    timer.wrap(engine.scheduler, "postprocess", "postprocess")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    steps, start = 0, time.perf_counter()
    try:
        while engine.has_unfinished():
            engine.step()
            steps += 1
    finally:
        timer.restore()
    total = time.perf_counter() - start
    tokens = params.max_tokens - 1
    row = {name: seconds * 1e6 / tokens for name, seconds in timer.totals.items()}
    row["step_total"] = total * 1e6 / tokens
    row["steps"] = steps
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out")
    args = parser.parse_args()
    llm = LLM(random_model("0.6b"), max_model_len=4096, max_num_seqs=256)
    cases = {
        "batch 1 greedy, min_tokens": (1, SamplingParams(temperature=0, max_tokens=128, min_tokens=128)),
        "batch 256 temperature 0.6": (256, SamplingParams(temperature=0.6, max_tokens=64, ignore_eos=True)),
    }
    rows = {}
    for name, (batch, params) in cases.items():
        breakdown(llm, batch, params)  # warm-up: pinned buffers, caches
        for async_scheduling in (True, False):
            llm.engine.config.async_scheduling = async_scheduling
            rows[f"{name}, async {async_scheduling}"] = breakdown(llm, batch, params)
        llm.engine.config.async_scheduling = True
    print(f"{torch.cuda.get_device_name()}, commit {commit()}  (microseconds per generated token)")
    for name, row in rows.items():
        print(f"== {name}")
        for part, value in row.items():
            print(f"   {part:26s} {value:10.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"commit": commit(), "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
