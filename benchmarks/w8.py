"""W8, a model larger than one GPU (DESIGN.md 3): the Qwen3-32B architecture (random bf16, 65 GB) at TP=2 and TP=4,
W2 and the first 128 W1 requests, beside HF ``generate`` on the same model dispatched over the GPUs as
``from_pretrained(device_map="auto")`` does.

The model is built once on cuda:0, then spread over 2 GPUs (transformers' balanced device map, accelerate's
``dispatch_model``) and served by ``LLM(model)`` without naming a size: a spread model is sharded over the GPUs it
lies on, so this is TP=2 and exercises that path. Then it is spread over 4 GPUs: TP=4. Then HF's own ``generate``
runs on the 4-GPU dispatch: W2 batch 1 (dynamic cache; ms/token over ``--hf-w2-new-tokens``) and W1's first
requests as one left-padded sampled batch, run for at most ``--hf-w1-window-s`` (``max_time``). Every row of a padded
batch is busy until the time runs out, HF's most favourable phase, so that rate is an upper bound on its whole-run
rate. The JSON at ``--out`` is rewritten after every measurement.

    python3 benchmarks/w8.py --out $OUT/w8.json        # 4 GPUs
    python3 benchmarks/w8.py --device cpu --tiny       # CPU smoke test (gloo ranks), a tiny model
"""
from __future__ import annotations

import argparse
import time
import traceback

import torch

from hf_minivllm import LLM
from tp import Run, _guarded, _timed, close, hf_batch1_ms, log, measure_w2_and_w1, tiny_qwen3
from workloads import random_model, w1_requests

TP_SIZES = (2, 4)


def build_model(run: Run):
    if run.args.tiny:
        return tiny_qwen3(run, vocab=10240, dtype=torch.bfloat16)
    return random_model("32b", device="cuda:0")


def spread(model, gpus: int) -> dict[str, int]:
    """Move ``model`` over the first ``gpus`` GPUs as ``device_map="auto"`` would (balanced), replacing any earlier
    dispatch; the number of modules per device."""
    from accelerate import dispatch_model
    from accelerate.hooks import remove_hook_from_submodules
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    remove_hook_from_submodules(model)
    # Explicit capacities: the model itself fills cuda:0 at first, and free memory would steer the map off it.
    capacity = {index: torch.cuda.get_device_properties(index).total_memory for index in range(gpus)}
    no_split = list(model._no_split_modules or [])
    max_memory = get_balanced_memory(model, max_memory=capacity, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    dispatch_model(model, device_map=device_map)
    counts: dict[str, int] = {}
    for where in device_map.values():
        counts[str(where)] = counts.get(str(where), 0) + 1
    return counts


def serve(run: Run, model, tp: int) -> None:
    """W2 and W1's first requests through ``LLM(model)`` at this tensor-parallel size."""
    row = run.part(f"tp{tp}")
    config = run.engine(max_model_len=4096, max_num_seqs=256)
    if run.cuda:
        row["device_map"] = spread(model, tp)
        log(f"TP={tp}: the model spread over {row['device_map']}")
    else:
        config["tensor_parallel_size"] = tp  # nothing to spread on CPU
    llm = None
    try:
        llm, row["build_s"] = _timed(lambda: LLM(model, **config))
        row["tensor_parallel_size"] = llm.config.tensor_parallel_size
        log(f"TP={row['tensor_parallel_size']}: engine built in {row['build_s']:.1f} s")
        measure_w2_and_w1(run, llm, row, f"TP={tp}")
    finally:
        close(llm)
        llm = None
        run.free()


def hf_padded_window(run: Run, model, prompts, params, window_s: float) -> dict:
    """One left-padded sampled ``generate`` over ``prompts`` for at most ``window_s``; a row's useful tokens stop
    at its own ``max_tokens`` (the padded batch generates up to the longest)."""
    width = max(len(p) for p in prompts)
    device = model.get_input_embeddings().weight.device
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for index, prompt in enumerate(prompts):
        ids[index, width - len(prompt):] = torch.tensor(prompt)
        mask[index, width - len(prompt):] = 1
    longest = max(sp.max_tokens for sp in params)
    with torch.no_grad():
        start = run.now()
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=longest,
                             min_new_tokens=longest, do_sample=True, temperature=0.6, top_k=0, top_p=1.0,
                             pad_token_id=0, max_time=window_s)
        seconds = run.now() - start
    steps = out.shape[1] - width
    tokens = sum(min(steps, sp.max_tokens) for sp in params)
    return {"requests": len(prompts), "steps": steps, "longest": longest, "complete": steps >= longest,
            "requests_finished": sum(steps >= sp.max_tokens for sp in params), "output_tokens": tokens,
            "seconds": seconds, "tok_s": tokens / seconds}


def hf_peer(run: Run, model) -> None:
    args, row = run.args, run.part("hf_device_map")
    if run.cuda:
        gpus = torch.cuda.device_count()
        row["device_map"] = spread(model, gpus)
        row["gpus"] = gpus
        log(f"HF: the model spread over {row['device_map']}")
    hf_batch1_ms(run, model, 8)  # warm-up
    row["w2_new_tokens"] = args.hf_w2_new_tokens
    row["batch1_ms_per_token"] = hf_batch1_ms(run, model, args.hf_w2_new_tokens)
    log(f"HF: batch 1 {row['batch1_ms_per_token']:.2f} ms/token")
    run.save()
    prompts, params = w1_requests(max_input_len=128, max_output_len=128) if args.tiny else w1_requests()
    prompts, params = prompts[:args.w1_requests], params[:args.w1_requests]
    window = max(10.0, min(args.hf_w1_window_s, run.remaining() - 30))
    batch = len(prompts)
    while True:  # a padded batch of long prompts may not fit the GPUs at once: then the first half of it, and so on
        try:
            row["w1"] = hf_padded_window(run, model, prompts[:batch], params[:batch], window)
            break
        except torch.OutOfMemoryError as error:
            row.setdefault("w1_out_of_memory_at_batch", []).append(batch)
            log(f"HF: W1 batch {batch} ran out of memory ({str(error)[:120]})")
            run.free()
            batch //= 2
            if batch < 8:
                raise
    log(f"HF: W1 {row['w1']['tok_s']:.0f} tok/s ({row['w1']['steps']} steps of {row['w1']['longest']} in "
        f"{row['w1']['seconds']:.0f} s, batch {batch})")


def figures(result: dict) -> list:
    """The run's figures for benchmarks/results (see results.py)."""
    from results import Figure

    parts, out = result.get("parts", {}), []
    hf = parts.get("hf_device_map", {})
    gpus = hf.get("gpus", "?")
    hf_name = f"HF generate, device_map=auto over {gpus} GPUs, dynamic cache"
    for tp in TP_SIZES:
        row = parts.get(f"tp{tp}", {})
        if row.get("batch1_ms_per_token"):
            out.append(Figure("W8 (32b, batch 1)", f"latency, TP={tp} vs HF device_map=auto", "ms/token",
                              row["batch1_ms_per_token"], f"LLM, TP={tp}", higher_is_better=False, peer=hf_name,
                              peer_value=hf.get("batch1_ms_per_token")))
        if "w1" in row:
            hf_w1 = hf.get("w1", {})
            out.append(Figure(f"W8 (32b, first {row['w1']['requests']} W1 requests)",
                              f"output throughput, TP={tp} vs HF device_map=auto", "tok/s", row["w1"]["tok_s"],
                              f"LLM, TP={tp}", peer=f"{hf_name}, padded batch of {hf_w1.get('requests')} for "
                              f"{hf_w1.get('seconds', 0):.0f} s (upper bound)", peer_value=hf_w1.get("tok_s")))
    return out


def print_summary(run: Run) -> None:
    parts = run.summary["parts"]
    print(f"\n== w8.py: {run.summary['device']} x{run.summary['gpus']}, commit {run.summary['commit']}, "
          f"{time.perf_counter() - run.started:.0f} s", flush=True)
    for name, row in parts.items():
        if "error" in row:
            print(f"   {name}: ERROR {str(row['error'])[:300]}", flush=True)
        if "batch1_ms_per_token" in row:
            print(f"   {name:14s} batch 1 {row['batch1_ms_per_token']:8.2f} ms/token", flush=True)
        if "w1" in row:
            w1 = row["w1"]
            print(f"   {name:14s} W1 {w1['requests']} requests {w1['tok_s']:8.0f} tok/s ({w1['output_tokens']} tokens "
                  f"in {w1['seconds']:.1f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results here as JSON (rewritten after every measurement)")
    parser.add_argument("--device", default="cuda", help="cuda (rank 0 on cuda:0) or cpu (smoke test, gloo)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and workload (smoke test)")
    parser.add_argument("--budget-s", type=float, default=560.0, help="wall seconds for the whole run; bounds the "
                        "HF W1 window")
    parser.add_argument("--tp", default="2,4", help="tensor-parallel sizes to run, comma-separated")
    parser.add_argument("--w2-new-tokens", type=int, default=256, help="batch-1 new tokens (W2: 256)")
    parser.add_argument("--w1-requests", type=int, default=128, help="the first N of W1's 256 requests")
    parser.add_argument("--hf-w2-new-tokens", type=int, default=128, help="HF batch-1 new tokens")
    parser.add_argument("--hf-w1-window-s", type=float, default=90.0, help="HF W1: wall seconds at most")
    parser.add_argument("--no-hf", action="store_true", help="skip HF's generate")
    args = parser.parse_args()
    if args.tiny:
        args.w2_new_tokens, args.hf_w2_new_tokens, args.w1_requests = 16, 8, min(args.w1_requests, 4)
    run = Run(args)
    run.started = time.perf_counter()
    log(f"{run.summary['device']} x{run.summary['gpus']}, torch {torch.__version__}, commit {run.summary['commit']}")
    model = build_model(run)
    run.save()
    try:
        for tp in (int(size) for size in args.tp.split(",") if size.strip()):
            if run.cuda and tp > torch.cuda.device_count():
                run.part(f"tp{tp}")["skipped"] = f"needs {tp} GPUs"
                continue
            _guarded(run, f"tp{tp}", lambda tp=tp: serve(run, model, tp))
        if not args.no_hf:
            _guarded(run, "hf_device_map", lambda: hf_peer(run, model))
    except Exception:  # noqa: BLE001 - whatever was measured is still written
        traceback.print_exc()
    finally:
        model = None
        print_summary(run)
        run.finish(figures, "w8")


if __name__ == "__main__":
    main()
