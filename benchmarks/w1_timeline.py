"""Where W1's wall time goes, step by step: prefill vs decode, and by decode batch size, how much of each step the
host spent waiting for the device (device-bound) and how much working (host-bound where the wait is near zero).

Runs W1 once through ``LLM.generate`` after a warm-up, with each engine step, each wait for a step's tokens and each
decode-graph launch timed on the host. Prints one table and writes it to --out as JSON as well. Every Triton kernel
specialisation first needed during the run (a compile, or a load from Triton's disk cache) is listed with its step:
after the engine's warm-up there should be none.

``--kv-cache-dtype fp8`` runs it on the FP8 cache; ``--kernels`` runs W1 a second time under the torch profiler and
lists the GPU time of the heaviest kernels (CUDA-graph replays included), to say where a cache's time goes;
``--busy-after N`` runs it again and profiles 30 steps after the first N, giving the share of that window the GPU
was busy (below 100%: the host kept it waiting).
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from triton import knobs

from hf_minivllm import LLM, SamplingParams
from hf_minivllm.engine import model_runner
from host_overhead import PartTimer
from workloads import commit, random_model, w1_requests, write_results

BUCKETS = ((1, 15), (16, 63), (64, 127), (128, 191), (192, 256))


def bucket_of(result_batch: int, is_prefill: bool) -> str:
    if is_prefill:
        return "prefill"
    for low, high in BUCKETS:
        if low <= result_batch <= high:
            return f"decode batch {low}-{high}"
    return "decode, nothing completed"


def timeline(llm: LLM, prompts, params) -> tuple[dict[str, dict[str, float]], float, int]:
    """(per-phase sums, wall seconds, tokens generated) of one run of the requests, step by step."""
    engine, runner = llm.engine, llm.engine.runner
    timer = PartTimer()
    timer.wrap(model_runner.LaunchedStep, "token_ids", "wait")
    if runner.graphs is not None:
        timer.wrap(runner.graphs, "run", "graph_launch")
    rows: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    step_index = 0

    def record_specialisation(**details) -> None:
        rows["triton specialisations"]["steps"] += 1
        print(f"step {step_index}: Triton specialisation {details.get('repr', '?')[:200]}")

    knobs.runtime.jit_cache_hook = record_specialisation
    tokens_before = engine.stats.generated_tokens
    engine.add_requests(prompts, params)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    try:
        while engine.has_unfinished():
            before = dict(timer.totals)
            step_start = time.perf_counter()
            result = engine.step()
            row = rows[bucket_of(len(result.updated), result.is_prefill)]
            row["steps"] += 1
            row["wall_s"] += time.perf_counter() - step_start
            for part in ("wait", "graph_launch"):
                row[f"{part}_s"] += timer.totals.get(part, 0.0) - before.get(part, 0.0)
            step_index += 1
    finally:
        timer.restore()
        knobs.runtime.jit_cache_hook = None
    return rows, time.perf_counter() - start, engine.stats.generated_tokens - tokens_before


def kernel_times(llm: LLM, prompts, params, top: int = 25) -> list[dict[str, float | str]]:
    """GPU milliseconds per kernel name over one run of the requests, the heaviest ``top`` first."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in profiler.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name][0] += event.device_time / 1000
            totals[event.name][1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])
    return [{"kernel": name[:90], "ms": round(ms, 2), "calls": calls} for name, (ms, calls) in ranked[:top]]


def gpu_busy_share(llm: LLM, prompts, params, skip_steps: int, window_steps: int = 30) -> dict[str, float]:
    """Share of the wall time of ``window_steps`` engine steps, after the first ``skip_steps`` of a run of the
    requests, in which the GPU ran a kernel or a copy (torch profiler, intervals merged), and the batch size then.
    The window starts from a drained GPU (one step's host preparation counts as idle) and ends with a sync."""
    engine = llm.engine
    engine.add_requests(prompts, params)
    for _ in range(skip_steps):
        if not engine.has_unfinished():
            raise ValueError(f"--busy-after {skip_steps}: the run has fewer steps")
        engine.step()
    batch = len(engine.scheduler.running)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        start = time.perf_counter()
        steps = 0
        while steps < window_steps and engine.has_unfinished():
            engine.step()
            steps += 1
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1000
    intervals = sorted((event.time_range.start, event.time_range.end) for event in profiler.events()
                       if event.device_type == torch.autograd.DeviceType.CUDA)
    busy_us, covered_until = 0.0, intervals[0][0] if intervals else 0.0
    for interval_start, interval_end in intervals:
        busy_us += max(0.0, interval_end - max(interval_start, covered_until))
        covered_until = max(covered_until, interval_end)
    while engine.has_unfinished():
        engine.step()
    return {"batch": batch, "steps": steps, "window_ms": wall_ms, "busy_share": busy_us / 1000 / wall_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"))
    parser.add_argument("--kernels", action="store_true", help="also list the heaviest kernels of a profiled run")
    parser.add_argument("--busy-after", type=int, help="also profile 30 steps after this many: GPU busy share")
    args = parser.parse_args()
    prompts, params = w1_requests()
    llm = LLM(random_model("0.6b"), max_model_len=4096, kv_cache_dtype=args.kv_cache_dtype)
    llm.generate([[1, 2, 3]], SamplingParams(), use_tqdm=False)  # warm-up
    rows, seconds, tokens = timeline(llm, prompts, params)
    print(f"{torch.cuda.get_device_name()}, commit {commit()}: W1 {seconds:.2f} s, {tokens} tokens, "
          f"{tokens / seconds:.0f} tok/s")
    print(f"{'phase':28s} {'steps':>6s} {'wall s':>8s} {'wait s':>8s} {'host s':>8s} {'graph launch s':>15s}")
    for name in sorted(rows, key=lambda key: (key != "prefill", key)):
        row = rows[name]
        print(f"{name:28s} {row['steps']:6.0f} {row['wall_s']:8.3f} {row['wait_s']:8.3f} "
              f"{row['wall_s'] - row['wait_s']:8.3f} {row['graph_launch_s']:15.3f}")
    kernels = kernel_times(llm, prompts, params) if args.kernels else []
    for row in kernels:
        print(f"{row['ms']:10.1f} ms {row['calls']:8d} calls  {row['kernel']}")
    busy = gpu_busy_share(llm, prompts, params, args.busy_after) if args.busy_after is not None else None
    if busy is not None:
        print(f"{busy['steps']} steps after step {args.busy_after} (batch {busy['batch']}): {busy['window_ms']:.1f} ms, "
              f"GPU busy {busy['busy_share']:.1%}")
    write_results(args.out, device=torch.cuda.get_device_name(), seconds=seconds, tokens=tokens, phases=rows,
                  kv_cache_dtype=args.kv_cache_dtype, kernels=kernels, gpu_busy=busy)


if __name__ == "__main__":
    main()
