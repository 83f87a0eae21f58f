"""The drop-in W1 batch with an HF logits processor: ``accelerate(model).generate`` with ``repetition_penalty``
(which the engine runs through HF's own processor, a step hook over the whole call's rows) beside the same call
without it, in one process, and beside HF ``generate`` with the same processor on a subset of the rows (padded
batch, dynamic cache). Each of our calls runs ``--runs`` times, alternately; the best run of each is reported, with
the engine steps it took.

    python benchmarks/dropin_processors.py --out dropin_processors.json
"""
from __future__ import annotations

import argparse
import copy
import json

import torch

import hf_minivllm
from results import finish_run
from workloads import commit, leading_rows, left_padded, random_model, timed, w1_requests

SAMPLING = dict(do_sample=True, temperature=0.6, top_k=0)
PROCESSOR = dict(repetition_penalty=1.1)


def figures(result: dict) -> list:
    """Ours with the processor beside HF with it, and beside ours without it (benchmarks/results, see results.py)."""
    from results import Figure

    workload = f"drop-in W1 batch, repetition_penalty={PROCESSOR['repetition_penalty']}"
    ours = result["with_processor"]["tok_s"]
    return [
        Figure(workload, "output throughput", "tok/s", ours, "accelerate(model).generate",
               peer=f"HF generate ({result['hf_subset']})", peer_value=result["hf_tok_s"]),
        Figure(workload, "output throughput, the processor's cost", "tok/s", ours, "accelerate(model).generate",
               peer="accelerate(model).generate without the processor",
               peer_value=result["without_processor"]["tok_s"]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--hf-subset", type=int, default=32, help="rows given to HF generate")
    parser.add_argument("--hf-new-tokens", type=int, default=128)
    parser.add_argument("--out")
    args = parser.parse_args()

    model = random_model("0.6b")
    oracle = copy.deepcopy(model)
    hf_minivllm.accelerate(model)
    prompts, _ = w1_requests()
    ids, mask = left_padded(prompts)
    model.generate(input_ids=ids[:8], attention_mask=mask[:8], max_new_tokens=8, **SAMPLING, **PROCESSOR)
    length = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    best: dict[str, dict] = {}
    for _ in range(args.runs):
        for label, extra in (("without_processor", {}), ("with_processor", PROCESSOR)):
            steps_before = hf_minivllm.stats(model)["steps"]
            out, seconds = timed(lambda: model.generate(input_ids=ids, attention_mask=mask, **length, **SAMPLING,
                                                        **extra))
            torch.cuda.synchronize()
            row = dict(tok_s=(out.shape[1] - ids.shape[1]) * len(prompts) / seconds, seconds=seconds,
                       steps=hf_minivllm.stats(model)["steps"] - steps_before)
            print(label, json.dumps(row), flush=True)
            if row["tok_s"] > best.get(label, {}).get("tok_s", 0):
                best[label] = row
    hf_minivllm.restore(model)
    del model

    sub_ids, sub_mask = leading_rows(ids, mask, args.hf_subset)
    hf_length = dict(max_new_tokens=args.hf_new_tokens, min_new_tokens=args.hf_new_tokens)
    oracle.generate(input_ids=sub_ids[:2], attention_mask=sub_mask[:2], max_new_tokens=4, **SAMPLING, **PROCESSOR)
    _, hf_seconds = timed(lambda: oracle.generate(input_ids=sub_ids, attention_mask=sub_mask, **hf_length,
                                                  **SAMPLING, **PROCESSOR))
    hf_tok_s = args.hf_subset * args.hf_new_tokens / hf_seconds
    print("HF generate", round(hf_tok_s), "tok/s", flush=True)
    summary = dict(commit=commit(), device=torch.cuda.get_device_name(0), new_tokens=args.new_tokens,
                   runs=args.runs, hf_subset=f"{args.hf_subset} prompts x {args.hf_new_tokens} new tokens",
                   hf_tok_s=hf_tok_s, **best)
    finish_run(args.out, summary, figures(summary), "dropin_processors")


if __name__ == "__main__":
    main()
