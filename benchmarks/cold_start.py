"""Cold start: from a fresh process to the first generated tokens, and where the time goes (issue: closer to the
floor, cold start).

Each case runs in a fresh Python process, first with an empty Triton cache (``TRITON_CACHE_DIR`` a new folder), then
again in another fresh process with the cache the first one filled. The process times its own phases:

- ``import``: torch, transformers and hf_minivllm;
- ``model``: the Qwen3-0.6B architecture built on the GPU with random bf16 weights (not part of the target: the
  caller's model exists already);
- ``engine``: ``LLM(model)`` or ``accelerate(model)``, split into the decoder build (the adapter's weight views),
  the concurrent compile of the kernels that the warm-up and the decode graphs launch (and of their launchers), the
  warm-up pass (a prefill and the samplers; it also measures activation memory), the rest of the KV cache's set-up,
  the decode-graph capture (with any decode kernel compiles left) and the prefill-graph capture;
  the Triton compile (or disk-cache load) time inside all of it is counted apart, by Triton's compile hooks,
  from each variant's first request to its kernel (summed over variants: under the concurrent compiles these
  overlap, so the sum exceeds the wall time they took);
- ``first call``: one 128-token prompt, 16 greedy tokens (``LLM.generate`` or the patched ``model.generate``).

    python3 benchmarks/cold_start.py --out $OUT/cold_start.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

START = time.perf_counter()
CASES = ("llm", "accelerate")
# With --compare-sequential: LLM(model) again with the compile-ahead passes switched off, each kernel variant
# compiling at its first launch one after another (what the engine did before them).
SEQUENTIAL_CASE = "llm-sequential-compiles"
# With --compare-fp8: LLM(model, kv_cache_dtype="fp8"), whose scale calibration runs a forward of its own.
FP8_CASE = "llm-fp8"


def child(case: str) -> dict:
    """One cold start, timed phase by phase in this process."""
    phases: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases[name] = now - mark
        mark = now

    import torch
    import transformers  # noqa: F401
    from triton import knobs

    import hf_minivllm
    from hf_minivllm import LLM, SamplingParams
    from hf_minivllm import llm as llm_module
    from hf_minivllm.engine import cuda_graphs, model_runner
    from host_overhead import PartTimer
    from workloads import random_model

    lap("import_s")
    torch.cuda.init()
    torch.empty(1, device="cuda")
    lap("cuda_init_s")
    model = random_model("0.6b", device="cuda")
    torch.cuda.synchronize()
    lap("model_s")

    compiles: dict[str, float] = defaultdict(float)
    variants: dict[str, set] = defaultdict(set)
    started: dict[object, float] = {}

    requested: list[tuple[float, str]] = []  # (when, kernel) of each variant's first compile request

    def variant_of(details: dict) -> tuple[str, str]:
        """(kernel name, Triton's key): the key alone is per kernel, so two kernels may share one."""
        return getattr(details["fn"], "name", str(details["fn"])), str(details["key"])

    def before_compile(**details) -> bool:
        variant = variant_of(details)
        if variant not in started:
            started[variant] = time.perf_counter()
            requested.append((started[variant], variant[0]))
        variants[variant[0]].add(variant[1])
        return False

    def after_compile(**details) -> None:
        variant = variant_of(details)
        begun = started.pop(variant, None)
        if begun is not None:
            compiles[variant[0]] += time.perf_counter() - begun

    knobs.runtime.jit_cache_hook = before_compile
    knobs.runtime.jit_post_compile_hook = after_compile
    windows: list[tuple[str, float, float]] = []  # (part, start, end) of every call of a timed part
    timer = PartTimer(windows)
    for owner, attribute, name in (
            (model_runner.ModelRunner, "_compile_kernels_ahead", "compile_ahead_s"),
            (model_runner.ModelRunner, "_profile_gpu_memory", "warm_up_s"),  # the warm-up pass, measuring memory
            (model_runner.ModelRunner, "_make_storage", "kv_cache_setup_s"),
            (model_runner.ModelRunner, "_calibrate_kv_scales", "kv_calibration_s"),  # an FP8 cache's
            (cuda_graphs.DecodeGraphs, "__init__", "graph_capture_s"),
            (cuda_graphs.PrefillGraphs, "__init__", "prefill_graph_capture_s"),
            (llm_module, "build_decoder", "decoder_build_s")):  # the name llm.py bound at import
        timer.wrap(owner, attribute, name)
    prompt = list(range(1000, 1128))
    if case == SEQUENTIAL_CASE:
        model_runner.compiles_kernels_ahead = lambda device: False
    if case in ("llm", SEQUENTIAL_CASE, FP8_CASE):
        engine = LLM(model, kv_cache_dtype="fp8" if case == FP8_CASE else "auto")
        torch.cuda.synchronize()
        lap("engine_s")
        engine.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    else:
        hf_minivllm.accelerate(model)
        torch.cuda.synchronize()
        lap("engine_s")
        model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                       pad_token_id=0)
    torch.cuda.synchronize()
    lap("first_call_s")
    parts = dict(timer.totals)
    parts["kv_cache_setup_s"] = parts.get("kv_cache_setup_s", 0.0) - parts.get("warm_up_s", 0.0)
    return {"case": case, "phases": phases, "engine_parts": parts,
            "compiles_by_part": _compiles_by_part(requested, windows),
            "triton_compile_s": sum(compiles.values()), "triton_compiles": dict(compiles),
            "triton_variants": {name: len(keys) for name, keys in variants.items()},
            "process_s": time.perf_counter() - START}


def _compiles_by_part(requested: list, windows: list) -> dict:
    """For each timed part (the innermost call around each request, else "other"), how many variants of each
    kernel were first requested in it: where compiles still happen one after another."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for when, kernel in requested:
        around = [(end - start, name) for name, start, end in windows if start <= when <= end]
        counts[min(around)[1] if around else "other"][kernel] += 1
    return {part: dict(kernels) for part, kernels in counts.items()}


def run_case(case: str, cache_dir: str) -> dict:
    env = {**os.environ, "TRITON_CACHE_DIR": cache_dir}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", case], env=env, capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).parent)
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"case": case, "error": (done.stdout + done.stderr)[-3000:], "wall_s": wall}
    return {**json.loads(lines[-1]), "wall_s": wall}


def figures(result: dict) -> list:
    from results import Figure

    out = []
    for row in result.get("runs", []):
        if "error" in row or row["cache"] != "empty Triton cache":
            continue
        if row["case"] not in CASES:
            continue
        name = "LLM(model)" if row["case"] == "llm" else "accelerate(model)"
        out.append(Figure("cold start (0.6b, fresh process, empty Triton cache)", f"{name} construction", "s",
                          row["phases"]["engine_s"], name, higher_is_better=False))
        out.append(Figure("cold start (0.6b, fresh process, empty Triton cache)",
                          f"{name}: import + construction + first 16 tokens", "s",
                          row["phases"]["import_s"] + row["phases"]["engine_s"] + row["phases"]["first_call_s"], name,
                          higher_is_better=False))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results here as JSON")
    parser.add_argument("--compare-sequential", action="store_true",
                        help="also time LLM(model) without the compile-ahead passes (not recorded as a figure)")
    parser.add_argument("--compare-fp8", action="store_true",
                        help="also time LLM(model) with the FP8 KV cache (not recorded as a figure)")
    parser.add_argument("--only-llm", action="store_true", help="leave out the accelerate(model) case")
    parser.add_argument("--child", choices=CASES + (SEQUENTIAL_CASE, FP8_CASE), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)), flush=True)
        return
    import torch

    from workloads import commit

    summary = {"device": torch.cuda.get_device_name(0), "commit": commit(), "runs": []}
    cases = (("llm",) if args.only_llm else CASES) + ((SEQUENTIAL_CASE,) if args.compare_sequential else ())
    for case in cases + ((FP8_CASE,) if args.compare_fp8 else ()):
        with tempfile.TemporaryDirectory(prefix="triton-cache-") as cache_dir:
            for cache in ("empty Triton cache", "warm Triton cache"):
                row = {**run_case(case, cache_dir), "cache": cache}
                summary["runs"].append(row)
                print(json.dumps(row, indent=1)[:4000], flush=True)
    from results import finish_run

    finish_run(args.out, summary, figures(summary), "cold_start")


if __name__ == "__main__":
    main()
