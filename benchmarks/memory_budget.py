"""How the engine's GPU memory compares with its ``gpu_memory_utilization`` budget, phase by phase (a diagnostic:
it records no figure).

``LLM(model)`` on the Qwen3-0.6B architecture with random bf16 weights, ``max_model_len=4096``; then W1's 256 prompts
of up to 1,024 tokens (100 to 128 new tokens each, temperature 0.6), 32 greedy tokens each, 32 with top-p 0.9, and 32
with top-p and 5 logprobs. Per phase: the allocated peak over the phase's start, PyTorch's reserved memory and the
device's memory in use after it, with the allocator's segments (how many, the largest) and the free bytes of its
split blocks. Reserved memory that grows well past the allocated peak is the allocator's
fragmentation (compare a run under ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``).

    python3 benchmarks/memory_budget.py --utilization 0.5 --max-num-seqs 256 --out $OUT/memory_budget.json
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from hf_minivllm import LLM, SamplingParams
from hf_minivllm.engine.model_runner import ModelRunner
from hf_minivllm.layers import sampler
from workloads import random_model, w1_requests, write_results

GIB = 1 << 30


def gib(value: float) -> float:
    return round(value / GIB, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--utilization", type=float, default=0.9, help="gpu_memory_utilization")
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--chunk-elements", type=int, help="the sampler's CHUNK_ELEMENTS (default: the sampler's)")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    if args.chunk_elements:
        sampler.CHUNK_ELEMENTS = args.chunk_elements

    profiles = []
    profile = ModelRunner._profile_gpu_memory

    def recorded_profile(self: ModelRunner) -> tuple[int, int, int, int]:
        profiles.append(profile(self))
        return profiles[-1]

    ModelRunner._profile_gpu_memory = recorded_profile
    model = random_model("0.6b")
    llm = LLM(model, gpu_memory_utilization=args.utilization, max_model_len=4096, max_num_seqs=args.max_num_seqs)
    ModelRunner._profile_gpu_memory = profile
    free, total = torch.cuda.mem_get_info()
    runner = llm.engine.runner
    forward_peak, sampling_peak, used_at_profile, _ = profiles[0]
    summary = dict(device=torch.cuda.get_device_name(), utilization=args.utilization, max_num_seqs=args.max_num_seqs,
                   allocator_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), chunk_elements=sampler.CHUNK_ELEMENTS,
                   budget_gib=gib(total * args.utilization), warm_up_forward_peak_gib=gib(forward_peak),
                   warm_up_sampling_peak_gib=gib(sampling_peak), in_use_at_profile_gib=gib(used_at_profile),
                   kv_cache_gib=gib(runner.num_blocks * runner.kv_bytes_per_block),
                   in_use_after_start_gib=gib(total - free), phases={})

    prompts, w1_params = w1_requests(256, 1024, 128)
    phases = {
        "w1 (temperature 0.6)": w1_params,
        "greedy": [SamplingParams(temperature=0.0, max_tokens=32)] * len(prompts),
        "top-p 0.9": [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=32)] * len(prompts),
        "top-p 0.9, logprobs 5": [SamplingParams(temperature=0.8, top_p=0.9, max_tokens=32, logprobs=5)] * len(prompts),
    }
    for name, params in phases.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        stats = torch.cuda.memory_stats()
        summary["phases"][name] = dict(
            allocated_peak_over_start_gib=gib(stats["allocated_bytes.all.peak"] - start),
            reserved_gib=gib(torch.cuda.memory_reserved()),
            in_use_gib=gib(total - torch.cuda.mem_get_info()[0]),
            segments=stats["segment.all.current"], inactive_split_gib=gib(stats["inactive_split_bytes.all.current"]),
            largest_segment_gib=gib(max(segment["total_size"] for segment in torch.cuda.memory_snapshot())))
    in_use_at_the_end = total - torch.cuda.mem_get_info()[0]
    summary["left_of_budget_gib"] = gib(total * args.utilization - in_use_at_the_end)
    print(json.dumps(summary, indent=2))
    write_results(args.out, **summary)


if __name__ == "__main__":
    main()
