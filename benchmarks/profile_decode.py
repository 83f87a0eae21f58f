"""Where a decode step's time goes on the GPU: graph replay alone vs the whole engine step, and the kernels.

Qwen3-0.6B architecture (random bf16). For batch sizes 1 and 256 it times (a) replaying the captured decode graph
alone and (b) full engine steps (host preparation, replay, sampling, scheduling), then lists the heaviest CUDA
kernels of a few profiled batch-1 steps. Writes the table to --out as JSON as well.
"""
from __future__ import annotations

import argparse
import json

import torch

from hf_minivllm import LLM, SamplingParams
from workloads import commit, random_model


def replay_ms(llm: LLM, batch: int, repeats: int = 50) -> float:
    graph = llm.engine.runner.graphs.graphs[batch]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def step_ms(llm: LLM, batch: int, context: int, new_tokens: int = 64) -> float:
    prompts = [[(7 * i + j) % 10000 for j in range(context)] for i in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    engine = llm.engine
    for prompt in prompts:
        engine.add_request(prompt, params)
    engine.step()  # prefill (the prompts are cached from the warm-up)
    start.record()
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out")
    args = parser.parse_args()
    llm = LLM(random_model("0.6b"), max_model_len=4096, max_num_seqs=256)
    rows = {}
    for batch, context in ((1, 128), (256, 1024)):
        rows[f"batch {batch}, context {context}"] = {
            "graph_replay_ms": replay_ms(llm, batch),
            "engine_step_ms": step_ms(llm, batch, context),
        }
    print(f"{torch.cuda.get_device_name()}, commit {commit()}")
    for name, row in rows.items():
        print(f"{name:26s} graph replay {row['graph_replay_ms']:.3f} ms   engine step {row['engine_step_ms']:.3f} ms")
    prompts = [[(3 * j) % 10000 for j in range(128)]]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as profiler:
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    table = profiler.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"commit": commit(), "rows": rows, "profile": table}, f, indent=2)


if __name__ == "__main__":
    main()
