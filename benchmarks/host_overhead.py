"""Where the host's time goes in an engine step: wall time of each part of ``LLMEngine.step``, per step.

Qwen3-0.6B architecture (random bf16) on CUDA, decode steps at batch 1 (greedy, W2-like, eos held off with
``min_tokens``) and batch 256 (W1's temperature 0.6), with async scheduling on and off. ``wait`` is the time the host
blocks on a step's tokens: with async scheduling it is the device time the host's work did not cover. Writes the
table to --out as JSON as well.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from hf_minivllm import LLM, SamplingParams
from hf_minivllm.engine import model_runner
from workloads import commit, random_model, write_results


class PartTimer:
    """Wraps named callables so every call adds its wall time to ``totals[name]`` (and, given ``windows``, appends
    its ``(name, start, end)`` there)."""

    def __init__(self, windows: list | None = None):
        self.totals: dict[str, float] = defaultdict(float)
        self.windows = windows
        self._restore: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                end = time.perf_counter()
                self.totals[name] += end - start
                if self.windows is not None:
                    self.windows.append((name, start, end))

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
    while engine.step().is_prefill or engine.scheduler.waiting:
        pass  # prefill steps stay out of the measurement
    tokens = params.max_tokens - 1 - max(seq.num_completion_tokens for seq in engine.scheduler.running)
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
    row = {name: seconds * 1e6 / tokens for name, seconds in timer.totals.items()}
    row["step_total"] = total * 1e6 / tokens
    row["steps"] = steps
    return row


def runtime_calls(llm: LLM, batch: int, params: SamplingParams, context: int = 1024 - 64) -> str:
    """CUDA runtime calls made by the host during decode steps (a synchronising call shows up here)."""
    engine = llm.engine
    for i in range(batch):
        engine.add_request([(5 * i + j) % 10000 for j in range(context if batch > 1 else 128)], params)
    while engine.step().is_prefill or engine.scheduler.waiting:
        pass
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as profiler:
        while engine.has_unfinished():
            engine.step()
    events = [e for e in profiler.key_averages() if e.key.startswith("cuda") or "Synchronize" in e.key]
    events.sort(key=lambda e: -e.cpu_time_total)
    return "\n".join(f"   {e.key:40s} calls {e.count:6d}  host ms {e.cpu_time_total / 1e3:9.2f}" for e in events)


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
    calls = {name: runtime_calls(llm, batch, params) for name, (batch, params) in cases.items()}
    print(f"{torch.cuda.get_device_name()}, commit {commit()}  (microseconds per generated token)")
    for name, row in rows.items():
        print(f"== {name}")
        for part, value in row.items():
            print(f"   {part:26s} {value:10.1f}")
    for name, text in calls.items():
        print(f"== CUDA runtime calls, {name}, async scheduling\n{text}")
    write_results(args.out, device=torch.cuda.get_device_name(), rows=rows, runtime_calls=calls)


if __name__ == "__main__":
    main()
