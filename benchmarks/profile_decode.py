"""Where a decode step's time goes on the GPU: graph replay alone vs the whole engine step, and the kernels.

Qwen3-0.6B architecture (random bf16). For batch sizes 1 and 256 it times (a) replaying the captured decode graph
alone and (b) full engine steps (host preparation, replay, sampling, scheduling), with async scheduling and one
step at a time, greedy and (batch 256) sampled at W1's temperature, then lists the heaviest CUDA kernels of a few
profiled steps at batch 1 (greedy) and 256 (sampled). Writes the tables to --out as JSON as well.
"""
from __future__ import annotations

import argparse

import torch

from hf_minivllm import LLM, SamplingParams
from workloads import commit, random_model, write_results


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


def step_ms(llm: LLM, batch: int, context: int, temperature: float, new_tokens: int = 64) -> float:
    prompts = [[(7 * i + j) % 10000 for j in range(context)] for i in range(batch)]
    params = SamplingParams(temperature=temperature, max_tokens=new_tokens, ignore_eos=True)
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
    return start.elapsed_time(end) / (new_tokens - 1)


def kernel_table(llm: LLM, batch: int, temperature: float) -> str:
    prompts = [[(3 * i + j) % 10000 for j in range(128)] for i in range(batch)]
    params = SamplingParams(temperature=temperature, max_tokens=16, ignore_eos=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as profiler:
        llm.generate(prompts, params, use_tqdm=False)
    return profiler.key_averages().table(sort_by="cuda_time_total", row_limit=25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out")
    args = parser.parse_args()
    llm = LLM(random_model("0.6b"), max_model_len=4096, max_num_seqs=256)
    rows = {}
    for batch, context, temperature in ((1, 128, 0.0), (256, 1024, 0.0), (256, 1024, 0.6)):
        row = {"graph_replay_ms": replay_ms(llm, batch)}
        for async_scheduling in (True, False):
            llm.engine.config.async_scheduling = async_scheduling
            key = "engine_step_ms" if async_scheduling else "engine_step_one_at_a_time_ms"
            row[key] = step_ms(llm, batch, context, temperature)
        llm.engine.config.async_scheduling = True
        rows[f"batch {batch}, context {context}, temperature {temperature}"] = row
    print(f"{torch.cuda.get_device_name()}, commit {commit()}")
    for name, row in rows.items():
        print(f"{name:42s} graph replay {row['graph_replay_ms']:.3f} ms   engine step {row['engine_step_ms']:.3f} ms"
              f"   one step at a time {row['engine_step_one_at_a_time_ms']:.3f} ms")
    tables = {"batch 1 greedy": kernel_table(llm, 1, 0.0), "batch 256 temperature 0.6": kernel_table(llm, 256, 0.6)}
    for name, table in tables.items():
        print(f"== {name}\n{table}")
    write_results(args.out, rows=rows, profiles=tables)


if __name__ == "__main__":
    main()
