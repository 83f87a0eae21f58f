"""A Gemma 3 architecture beside HF (issue: the models people load): Gemma 3 4B's text model (34 layers, hidden
2,560, 8 heads, 4 KV heads, head_dim 256, five sliding-window layers of 1,024 tokens to every global one, vocab
262,208), random bf16, on one GPU.

W2 (batch 1, 128 prompt tokens, 256 new, greedy: ms/token, best of two) and W1's first 128 requests (output tok/s;
prompts and outputs up to 1,024 tokens, so the window bites) through ``LLM(model)``, then HF on the same model:
``generate`` batch 1 with its default (dynamic) cache; continuous batching on the same 128 requests for at most
``--hf-cb-window-s``, with and without its CUDA graphs (``bench_gpu.hf_continuous_batching``; on this model its
graph warm-up fails to allocate blocks, so the better of the two is HF's figure); then ``generate`` batch 1 with its
static cache (auto-compiled; the first call compiles, which took over 100 s for this model on an H100). The JSON
at ``--out`` is rewritten after every measurement.

    python3 benchmarks/gemma3.py --out $OUT/gemma3.json
    python3 benchmarks/gemma3.py --device cpu --tiny      # CPU smoke test, a tiny model
"""
from __future__ import annotations

import argparse
import time
import traceback

import torch

from hf_minivllm import LLM
from tp import START, Run, _guarded, _timed, close, hf_batch1_ms, log, measure_w2_and_w1
from workloads import w1_requests


def gemma3_model(run: Run):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    if run.args.tiny:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, vocab_size=10240, sliding_window=16)
    else:
        shape = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                     num_key_value_heads=4, head_dim=256, vocab_size=262208, sliding_window=1024)
    config = Gemma3TextConfig(**shape, query_pre_attn_scalar=shape["head_dim"], max_position_embeddings=131072,
                              rope_scaling={"rope_type": "linear", "factor": 8.0}, bos_token_id=2, eos_token_id=1,
                              pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(run.device):
        model = Gemma3ForCausalLM(config).to(torch.bfloat16)
    return model.eval()


def ours(run: Run, model) -> None:
    row = run.part("ours")
    llm = None
    try:
        llm, row["build_s"] = _timed(lambda: LLM(model, **run.engine(max_model_len=4096, max_num_seqs=256)))
        measure_w2_and_w1(run, llm, row, "ours")
    finally:
        close(llm)
        run.free()


def hf_static(run: Run, model) -> None:
    args, row = run.args, run.part("hf_static")
    settings = {} if run.args.tiny else {"cache_implementation": "static"}
    _, row["first_call_s"] = _timed(lambda: hf_batch1_ms(run, model, args.w2_new_tokens, **settings))  # compiles
    row["batch1_ms_per_token"] = hf_batch1_ms(run, model, args.w2_new_tokens, **settings)
    log(f"HF static cache: batch 1 {row['batch1_ms_per_token']:.2f} ms/token")


def hf_dynamic(run: Run, model) -> None:
    row = run.part("hf_dynamic")
    hf_batch1_ms(run, model, 16)  # warm-up
    row["batch1_ms_per_token"] = hf_batch1_ms(run, model, run.args.w2_new_tokens)
    log(f"HF dynamic cache: batch 1 {row['batch1_ms_per_token']:.2f} ms/token")


def hf_cb(run: Run, model, use_cuda_graph: bool) -> None:
    from bench_gpu import hf_continuous_batching

    args = run.args
    row = run.part("hf_continuous_batching" + ("" if use_cuda_graph else "_no_graph"))
    prompts, params = w1_requests(max_input_len=128, max_output_len=128) if args.tiny else w1_requests()
    prompts, params = prompts[:args.w1_requests], params[:args.w1_requests]
    window = max(10.0, min(args.hf_cb_window_s, run.remaining() - 20))
    tokens, seconds = hf_continuous_batching(model, prompts, params, window_s=window, use_cuda_graph=use_cuda_graph)
    row.update(requests=len(prompts), window_s=window, output_tokens=tokens, seconds=seconds, tok_s=tokens / seconds,
               cuda_graph=use_cuda_graph)
    log(f"HF continuous batching (CUDA graphs {use_cuda_graph}): {row['tok_s']:.0f} tok/s ({tokens} tokens in "
        f"{seconds:.0f} s)")


def figures(result: dict) -> list:
    from results import Figure

    parts, out = result.get("parts", {}), []
    mine = parts.get("ours", {})
    # HF's best batch-1 cache and its best continuous-batching setting are its figures.
    batch1 = [(row["batch1_ms_per_token"], name) for name, row in (("static", parts.get("hf_static", {})),
                                                                   ("dynamic", parts.get("hf_dynamic", {})))
              if row.get("batch1_ms_per_token")]
    cb_runs = [row for name, row in parts.items() if name.startswith("hf_continuous_batching") and row.get("tok_s")]
    cb = max(cb_runs, key=lambda row: row["tok_s"], default={})
    if mine.get("batch1_ms_per_token"):
        best = min(batch1, default=(None, None))
        out.append(Figure("Gemma 3 4B architecture, batch 1 (W2)", "latency", "ms/token", mine["batch1_ms_per_token"],
                          "LLM.generate", higher_is_better=False,
                          peer=f"HF generate, {best[1]} cache" if best[1] else None, peer_value=best[0]))
    if "w1" in mine:
        graphs = "" if cb.get("cuda_graph", True) else ", no CUDA graphs"
        out.append(Figure(f"Gemma 3 4B architecture, first {mine['w1']['requests']} W1 requests", "output throughput",
                          "tok/s", mine["w1"]["tok_s"], "LLM.generate",
                          peer=f"HF continuous batching{graphs} (first {cb['seconds']:.0f} s)" if cb else None,
                          peer_value=cb.get("tok_s")))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results here as JSON (rewritten after every measurement)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and workload (smoke test)")
    parser.add_argument("--budget-s", type=float, default=240.0, help="wall seconds for the run; bounds HF's parts")
    parser.add_argument("--w2-new-tokens", type=int, default=256)
    parser.add_argument("--w1-requests", type=int, default=128)
    parser.add_argument("--hf-cb-window-s", type=float, default=60.0)
    parser.add_argument("--hf-static-min-s", type=float, default=90.0, help="run HF's static cache only with this "
                        "much of the budget left")
    args = parser.parse_args()
    if args.tiny:
        args.w2_new_tokens, args.w1_requests = 16, min(args.w1_requests, 4)
    run = Run(args)
    log(f"{run.summary['device']}, torch {torch.__version__}, commit {run.summary['commit']}")
    model = gemma3_model(run)
    try:
        _guarded(run, "ours", lambda: ours(run, model))
        _guarded(run, "hf_dynamic", lambda: hf_dynamic(run, model))
        if run.cuda:  # bounded by their windows, so first: the static cache's compile may take minutes
            _guarded(run, "hf_continuous_batching_no_graph", lambda: hf_cb(run, model, use_cuda_graph=False))
            _guarded(run, "hf_continuous_batching", lambda: hf_cb(run, model, use_cuda_graph=True))
        if run.remaining() >= args.hf_static_min_s:
            _guarded(run, "hf_static", lambda: hf_static(run, model))
        else:
            run.part("hf_static")["skipped"] = f"only {run.remaining():.0f} s of the budget left"
    except Exception:  # noqa: BLE001 - whatever was measured is still written
        traceback.print_exc()
    finally:
        print(f"\n== gemma3.py: {run.summary['device']}, commit {run.summary['commit']}, "
              f"{time.perf_counter() - START:.0f} s: " + str(run.summary["parts"])[:3000], flush=True)
        run.finish(figures, "gemma3")


if __name__ == "__main__":
    main()
