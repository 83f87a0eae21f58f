"""Data-parallel scale-out on Ray: W1's 256 requests repeated 4 times through ``hf_minivllm.ray.generate`` with 2
replicas against 1 replica, and against one ``LLM.generate`` on one GPU (DESIGN.md W1 model, random bf16).

Each configuration runs in a fresh subprocess (its own Ray cluster and CUDA context). A Ray figure is timed from
the ``generate`` call to its materialized result, replica start-up included (what a user waits for); the same call
on 2 rows with 1 new token, run just before, measures that start-up, and "minus start-up" subtracts it.

    python benchmarks/ray_dp.py --out results.json          # on a machine with 2 GPUs
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

from results import finish_run
from workloads import commit, random_model, timed, w1_requests

REPEATS = 4


def _requests() -> tuple[list[list[int]], list]:
    prompts, params = w1_requests()
    return prompts * REPEATS, params * REPEATS


def save_model(folder: str) -> None:
    random_model("0.6b").save_pretrained(folder)


def run_llm(folder: str) -> dict:
    from hf_minivllm import LLM, SamplingParams

    prompts, params = _requests()
    llm, start_s = timed(lambda: LLM(folder))
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up, as W1 does
    outputs, seconds = timed(lambda: llm.generate(prompts, params, use_tqdm=False))
    tokens = sum(len(output["token_ids"]) for output in outputs)
    return dict(config="LLM.generate, 1 GPU", start_s=start_s, seconds=seconds, output_tokens=tokens,
                tok_s=tokens / seconds)


def run_ray(folder: str, replicas: int) -> dict:
    import ray
    import ray.data

    import hf_minivllm.ray as hf_ray

    ray.init(log_to_driver=False)
    prompts, params = _requests()
    rows = [{"id": i, "prompt": prompt, "params": {"temperature": p.temperature, "ignore_eos": p.ignore_eos,
                                                     "max_tokens": p.max_tokens}}
            for i, (prompt, p) in enumerate(zip(prompts, params))]
    tiny = ray.data.from_items([{"prompt": [1, 2, 3], "params": {"max_tokens": 1}}] * 2)
    _, start_s = timed(lambda: hf_ray.generate(tiny, folder, num_replicas=replicas,
                                               sampling_params_column="params", use_tqdm=False).take_all())
    dataset = ray.data.from_items(rows)
    result, seconds = timed(lambda: hf_ray.generate(dataset, folder, num_replicas=replicas,
                                                    sampling_params_column="params", use_tqdm=False))
    rows_out = result.take_all()
    tokens = sum(len(row["generated_token_ids"]) for row in rows_out)
    assert sorted(row["id"] for row in rows_out) == list(range(len(rows))), "every row exactly once"
    ray.shutdown()
    return dict(config=f"ray.generate, {replicas} replica(s)", start_s=start_s, seconds=seconds,
                output_tokens=tokens, tok_s=tokens / seconds, tok_s_minus_start=tokens / max(seconds - start_s, 1e-9))


def _child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=500)
    if out.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def figures(result: dict) -> list:
    """The run's figures for benchmarks/results (see results.py)."""
    from results import Figure

    by_config = {row["config"]: row for row in result["results"]}
    llm, one, two = (by_config.get(name) for name in (
        "LLM.generate, 1 GPU", "ray.generate, 1 replica(s)", "ray.generate, 2 replica(s)"))
    workload = "W1 x4 (1,024 requests)"
    out = []
    if one and two:
        out.append(Figure(workload, "end-to-end output throughput", "tok/s", two["tok_s"], "ray.generate, 2 replicas",
                          peer="ray.generate, 1 replica", peer_value=one["tok_s"]))
    if llm and two:
        out.append(Figure(workload, "output throughput (Ray: start-up included)", "tok/s", two["tok_s"],
                          "ray.generate, 2 replicas", peer="LLM.generate, 1 GPU (construction excluded)",
                          peer_value=llm["tok_s"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results here as JSON")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, folder = args.child
        result = run_llm(folder) if mode == "llm" else run_ray(folder, int(mode))
        print(json.dumps(result))
        return
    import torch

    folder = tempfile.mkdtemp(prefix="w1-model-")
    save_model(folder)
    summary = dict(commit=commit(), device=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(), results=[])
    for mode in ("llm", "1", "2"):
        summary["results"].append(_child(["--child", mode, folder]))
        print(json.dumps(summary["results"][-1]), flush=True)
        if args.out:  # after each configuration: a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump(summary, f, indent=2)
    by_config = {r["config"]: r for r in summary["results"]}
    one, two = by_config["ray.generate, 1 replica(s)"], by_config["ray.generate, 2 replica(s)"]
    summary.update(
        two_vs_one_replica=two["tok_s"] / one["tok_s"],
        two_vs_one_replica_minus_start=two["tok_s_minus_start"] / one["tok_s_minus_start"],
        two_replicas_vs_llm=two["tok_s"] / by_config["LLM.generate, 1 GPU"]["tok_s"],
    )
    print(json.dumps(summary, indent=2))
    finish_run(args.out, summary, figures(summary), "ray_dp")


if __name__ == "__main__":
    main()
