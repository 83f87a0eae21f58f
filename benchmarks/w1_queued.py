"""W1 with more requests queued than the engine runs at once: W1's 256 requests repeated ``--repeats`` times in one
``LLM.generate`` call, so requests are admitted as others finish (every step may carry prefill). Compared with
mixed steps on and off, prefill graphs on and off (``max_prefill_graph_tokens=0``), and with W1 itself, in one
process; prints throughput and the engine's step counters.

    python benchmarks/w1_queued.py --repeats 1 4 --out w1_queued.json
"""
from __future__ import annotations

import argparse
import json

import torch

from hf_minivllm import LLM, SamplingParams
from results import finish_run
from workloads import commit, random_model, timed, w1_requests


def figures(result: dict) -> list:
    """Mixed steps beside separate prefill and decode steps, per workload (benchmarks/results, see results.py)."""
    from results import Figure

    rows = {(row["repeats"], row["mixed_steps"], row.get("prefill_graphs", True)): row for row in result["results"]}
    out = []
    for (repeats, mixed, graphs), row in sorted(rows.items()):
        workload = "W1" if repeats == 1 else f"W1 x{repeats} in one call"
        separate, eager = rows.get((repeats, False, True)), rows.get((repeats, True, False))
        if mixed and graphs and separate:
            out.append(Figure(workload, "output throughput", "tok/s", row["tok_s"], "LLM.generate, mixed steps",
                              peer="LLM.generate, separate prefill and decode steps", peer_value=separate["tok_s"]))
        if mixed and graphs and eager:
            out.append(Figure(workload, "output throughput", "tok/s", row["tok_s"], "LLM.generate, prefill graphs",
                              peer="LLM.generate, prefills eager", peer_value=eager["tok_s"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--out")
    parser.add_argument("--no-prefill-graph-comparison", dest="compare_graphs", action="store_false")
    args = parser.parse_args()
    model = random_model("0.6b")
    results = []
    settings = [(True, True), (False, True)] + ([(True, False)] if args.compare_graphs else [])
    for mixed, graphs in settings:
        llm, start_s = timed(lambda: LLM(model, mixed_steps=mixed, **({} if graphs else dict(max_prefill_graph_tokens=0))))
        print(f"engine start (mixed_steps={mixed}, prefill graphs={graphs}): {start_s:.1f} s", flush=True)
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8), use_tqdm=False)
        for repeats in args.repeats:
            prompts, params = w1_requests()
            before = llm.stats.as_dict()
            outputs, seconds = timed(lambda: llm.generate(prompts * repeats, params * repeats, use_tqdm=False))
            after = llm.stats.as_dict()
            tokens = sum(len(output["token_ids"]) for output in outputs)
            row = dict(mixed_steps=mixed, prefill_graphs=graphs, engine_start_s=start_s, repeats=repeats, seconds=seconds, output_tokens=tokens,
                       tok_s=tokens / seconds, steps=after["steps"] - before["steps"],
                       preemptions=after["preemptions"] - before["preemptions"],
                       prefix_cache_hit_tokens=after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"],
                       kv_blocks=llm.engine.scheduler.block_manager.num_blocks)
            results.append(row)
            print(json.dumps(row), flush=True)
        llm.close()
        torch.cuda.empty_cache()
    summary = dict(commit=commit(), device=torch.cuda.get_device_name(0), results=results)
    finish_run(args.out, summary, figures(summary), "w1_queued")


if __name__ == "__main__":
    main()
