"""GPU benchmarks W1, W2, the drop-in path and W5 (DESIGN.md section 3), each beside its HF peer in the same run.

Prints one table (tokens/s or ms/token, ratio to each peer, ratio to the physical floor, device, commit) and
writes every figure to --out as JSON. HF peers: continuous batching (`generate_batch` machinery with CUDA graphs
and async batching, its best measured setting) for W1 on a prefix of the requests or on all of them over a time
window; `generate` with the static cache for W2; plain padded `generate` for the drop-in batch, on a subset.
Subsets and windows are labelled as such.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import time
import traceback
from typing import Iterator

import torch

import hf_minivllm
from hf_minivllm import LLM, SamplingParams
from hf_minivllm.layers import linear
from hf_minivllm.layers.attention import Attention
from hf_minivllm.patches.state import state_of
from results import finish_run
from workloads import commit, leading_rows, left_padded, random_model, w1_requests, w3_requests

W1_FLOOR_TOK_S = 25_000  # DESIGN.md 3: KV reads + weights per step at ~3 TB/s on an H100
W2_FLOOR_MS = 0.4  # weights alone (1.2 GB) per step


def progress(message: str) -> None:
    """A line per finished part, so a run cut off by its time limit still shows what it measured."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def now() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def hf_continuous_batching(model, prompts, params, window_s: float | None = None,
                           use_cuda_graph: bool = True) -> tuple[int, float]:
    """HF's continuous batching on the given requests (per-request max_new_tokens, eos never stops them).

    With ``window_s`` it runs only that long and counts the tokens generated so far (finished requests plus the
    running ones' progress, read from its scheduler once at the end): all requests are in flight during the first
    part of the run, HF's most favourable phase, so the rate is an upper bound on its whole-run rate.
    """
    from transformers import ContinuousBatchingConfig, GenerationConfig

    config = GenerationConfig(do_sample=True, temperature=0.6, top_k=None, top_p=None, max_new_tokens=1024,
                              eos_token_id=-1, pad_token_id=0)
    cb_config = ContinuousBatchingConfig(use_cuda_graph=use_cuda_graph, use_async_batching=True)
    with model.continuous_batching_context_manager(generation_config=config, continuous_batching_config=cb_config,
                                                   block=True, timeout=30) as manager:
        start = now()
        ids = [manager.add_request(p, max_new_tokens=sp.max_tokens, eos_token_id=-1) for p, sp in zip(prompts, params)]
        tokens, done = 0, set()
        while len(done) < len(ids) and (window_s is None or time.perf_counter() - start < window_s):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished() and result.request_id not in done:
                done.add(result.request_id)
                tokens += len(result.generated_tokens)
        if len(done) < len(ids):
            running = list(manager.batch_processor.scheduler.active_requests.values())
            tokens += sum(len(state.generated_tokens) for state in running if state.request_id not in done)
        seconds = now() - start
        if len(done) < len(ids):
            manager.stop(block=True, timeout=30, hard_stop=True)
    progress(f"HF continuous batching: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.0f} tok/s")
    return tokens, seconds


def run_llm(model, prompts, params, warm_up: tuple | None = None, **engine) -> tuple[int, float, dict]:
    """Tokens, seconds and stats of ``LLM.generate`` after a warm-up call: one 3-token prompt, or ``warm_up``'s
    (prompts, params) to leave out one-time work that such a workload does at its first call."""
    llm = LLM(model, max_model_len=4096, **engine)
    llm.generate(*(warm_up or ([[1, 2, 3]], SamplingParams())), use_tqdm=False)
    start = now()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = now() - start
    stats = hf_minivllm.stats(llm)
    tokens = sum(len(o["token_ids"]) for o in outputs)
    progress(f"LLM.generate {engine or ''}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.0f} tok/s")
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return tokens, seconds, stats


def w1(results: dict, size: str, hf_requests: int, hf_window_s: float = 0, compare_sync: bool = False,
       compare_mixed: bool = False, compare_fp8_kv: bool = False) -> None:
    """W1 through LLM.generate; HF CB on a prefix of ``hf_requests`` requests or on all of them for ``hf_window_s``."""
    prompts, params = w1_requests()
    model = random_model(size)
    tokens, seconds, stats = run_llm(model, prompts, params)
    row = {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "floor_tok_s": W1_FLOOR_TOK_S,
           "stats": stats}
    if compare_sync:
        sync_tokens, sync_seconds, _ = run_llm(model, prompts, params, async_scheduling=False)
        row.update(one_step_at_a_time_tok_s=sync_tokens / sync_seconds)
    if compare_mixed:
        separate_tokens, separate_seconds, _ = run_llm(model, prompts, params, mixed_steps=False)
        row.update(separate_prefill_decode_tok_s=separate_tokens / separate_seconds)
    if compare_fp8_kv:
        fp8_tokens, fp8_seconds, fp8_stats = run_llm(model, prompts, params, kv_cache_dtype="fp8")
        row.update(fp8_kv_tok_s=fp8_tokens / fp8_seconds, fp8_kv_stats=fp8_stats)
    if hf_window_s:
        hf_tokens, hf_seconds = hf_continuous_batching(model, prompts, params, window_s=hf_window_s)
        row.update(hf_cb_requests=f"all {len(prompts)}, first {hf_window_s:.0f} s", hf_cb_tokens=hf_tokens,
                   hf_cb_seconds=hf_seconds, hf_cb_tok_s=hf_tokens / hf_seconds)
    elif hf_requests:
        hf_tokens, hf_seconds = hf_continuous_batching(model, prompts[:hf_requests], params[:hf_requests])
        row.update(hf_cb_requests=hf_requests, hf_cb_tokens=hf_tokens, hf_cb_seconds=hf_seconds,
                   hf_cb_tok_s=hf_tokens / hf_seconds)
    results[f"W1_{size}"] = row
    del model
    gc.collect()
    torch.cuda.empty_cache()


@contextlib.contextmanager
def cublas_projections() -> Iterator[None]:
    """Engines built inside run every projection on cuBLAS (the few-rows GEMV kernel off): a same-run peer."""
    saved = linear.GEMV_MAX_ROWS
    linear.GEMV_MAX_ROWS = 0
    try:
        yield
    finally:
        linear.GEMV_MAX_ROWS = saved


@contextlib.contextmanager
def separate_kv_writes() -> Iterator[None]:
    """Engines built inside write each layer's keys and values with the store kernel, not in the rotary launch:
    a same-run peer of the fused write."""
    saved = Attention.cache_write
    Attention.cache_write = lambda self: None
    try:
        yield
    finally:
        Attention.cache_write = saved


SEPARATE_KV_WRITE_PEER = "accelerate(model).generate, K/V written by the store kernel"
PEER_ENGINES = {"cublas_ms_per_token": cublas_projections, "separate_kv_write_ms_per_token": separate_kv_writes}


def batch1_ms(model, prompt: torch.Tensor, new_tokens: int, **engine) -> float:
    """ms per token of a greedy batch-1 ``generate`` through ``accelerate`` (after one warm-up call)."""
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    hf_minivllm.accelerate(model, max_model_len=4096, **engine)
    model.generate(prompt, **settings)
    start = now()
    model.generate(prompt, **settings)
    return (now() - start) * 1000 / new_tokens


def w3(results: dict) -> None:
    """W3 with prefix caching and cascade attention, then with each turned off in turn; and with both after a
    warm-up call of W3's shape (other own tokens), whose cascade graphs, captured at their first use, then exist
    (its prefix is then cached too)."""
    prompts, params = w3_requests()
    warm_up = w3_requests(own_seed=1)
    model = random_model("0.6b")
    row = results["W3_0.6b"] = {}
    cascade = dict(cascade_attention=True)
    for key, warm, engine in (("tok_s", None, cascade), ("second_call_tok_s", warm_up, cascade),
                              ("no_cascade_tok_s", None, dict(cascade_attention=False)),
                              ("no_prefix_caching_tok_s", None, dict(enable_prefix_caching=False))):
        tokens, seconds, stats = run_llm(model, prompts, params, warm, **engine)
        row[key] = tokens / seconds
        row[key.replace("tok_s", "stats")] = stats
    del model
    gc.collect()
    torch.cuda.empty_cache()


def w2_and_drop_in(results: dict, hf_subset: int, peers: tuple[str, ...] = ()) -> None:
    """W2 (batch 1 through ``accelerate(model).generate``) beside HF's static cache, then the drop-in W1 batch beside
    HF generate; then W2 on each engine of ``peers`` (keys of ``PEER_ENGINES``)."""
    model = random_model("0.6b")
    oracle = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 10000, (1, 128), generator=generator).cuda()
    settings = dict(max_new_tokens=256, min_new_tokens=256, do_sample=False)

    oracle.generate(prompt, **settings, cache_implementation="static")  # compiles
    start = now()
    oracle.generate(prompt, **settings, cache_implementation="static")
    hf_ms = (now() - start) * 1000 / 256

    # Prefix caching off: the repeated prompts below would otherwise skip their prefill on later runs.
    ours_ms = batch1_ms(model, prompt, 256, enable_prefix_caching=False)
    results["W2"] = {"ms_per_token": ours_ms, "hf_static_ms_per_token": hf_ms, "floor_ms": W2_FLOOR_MS,
                     "fallbacks": hf_minivllm.stats(model)["fallbacks"]}

    prompts, _ = w1_requests()
    ids, mask = left_padded(prompts)
    width = ids.shape[1]
    drop_in = dict(max_new_tokens=512, min_new_tokens=512, do_sample=True, temperature=0.6, top_k=0)
    start = now()
    out = model.generate(input_ids=ids, attention_mask=mask, **drop_in)
    drop_seconds = now() - start
    drop_tokens = (out.shape[1] - width) * len(prompts)
    llm = state_of(model).llm
    params = SamplingParams(temperature=0.6, max_tokens=512, ignore_eos=True)
    start = now()
    llm.generate(prompts, params, use_tqdm=False)
    llm_seconds = now() - start
    row = {"tokens": drop_tokens, "drop_in_tok_s": drop_tokens / drop_seconds,
           "llm_tok_s": len(prompts) * 512 / llm_seconds, "fallbacks": hf_minivllm.stats(model)["fallbacks"]}
    if hf_subset:
        sub_ids, sub_mask = leading_rows(ids, mask, hf_subset)
        hf_new = 128
        start = now()
        oracle.generate(input_ids=sub_ids, attention_mask=sub_mask, max_new_tokens=hf_new, min_new_tokens=hf_new,
                        do_sample=True, temperature=0.6, top_k=0)
        hf_seconds = now() - start
        row.update(hf_generate_subset=f"{hf_subset} prompts x {hf_new} new tokens",
                   hf_generate_tok_s=hf_subset * hf_new / hf_seconds)
    results["drop_in_W1_batch"] = row
    del llm
    hf_minivllm.restore(model)  # one engine at a time
    for key in peers:  # last: these accelerate the HF oracle in place
        with PEER_ENGINES[key]():
            results["W2"][key] = batch1_ms(oracle, prompt, 256, enable_prefix_caching=False)
        hf_minivllm.restore(oracle)
    del model, oracle
    gc.collect()
    torch.cuda.empty_cache()


def w5_batch1(results: dict, peers: tuple[str, ...] = ()) -> None:
    prompt = torch.randint(0, 10000, (1, 128)).cuda()
    runs = [("ms_per_token", contextlib.nullcontext)] + [(key, PEER_ENGINES[key]) for key in peers]
    row = results["W5_8b_batch1"] = {}
    for key, engine in runs:
        model = random_model("8b")
        with engine():
            row[key] = batch1_ms(model, prompt, 128)
        del model
        gc.collect()
        torch.cuda.empty_cache()


def print_table(results: dict) -> None:
    device = torch.cuda.get_device_name()
    print(f"\n{device}, torch {torch.__version__}, commit {commit()}")
    for name, row in results.items():
        print(f"== {name}")
        for key, value in row.items():
            print(f"   {key:22s} {value:.2f}" if isinstance(value, float) else f"   {key:22s} {value}")
    if "W1_0.6b" in results and "hf_cb_tok_s" in results["W1_0.6b"]:
        row = results["W1_0.6b"]
        print(f"W1: {row['tok_s']:.0f} tok/s = {row['tok_s'] / row['hf_cb_tok_s']:.1f}x HF CB "
              f"({row['hf_cb_requests']} requests), {row['tok_s'] / W1_FLOOR_TOK_S:.2f} of floor")
    if "W2" in results:
        row = results["W2"]
        print(f"W2: {row['ms_per_token']:.2f} ms/token vs HF static {row['hf_static_ms_per_token']:.2f} "
              f"({row['hf_static_ms_per_token'] / row['ms_per_token']:.1f}x)")
    if "drop_in_W1_batch" in results:
        row = results["drop_in_W1_batch"]
        print(f"drop-in: {row['drop_in_tok_s']:.0f} tok/s = {row['drop_in_tok_s'] / row['llm_tok_s']:.2f}x LLM.generate")


def figures(result: dict) -> list:
    """The run's figures for benchmarks/results (see results.py), each beside its peer of the same run."""
    from results import Figure

    out = []
    for size in ("0.6b", "8b"):
        row = result.get(f"W1_{size}")
        if row and "tok_s" in row:
            peer = row.get("hf_cb_tok_s")
            out.append(Figure(f"W1 ({size})", "output throughput", "tok/s", row["tok_s"], "LLM.generate",
                              peer=f"HF continuous batching ({row['hf_cb_requests']} requests)" if peer else None,
                              peer_value=peer))
        if row and "fp8_kv_tok_s" in row:
            out.append(Figure(f"W1 ({size})", "output throughput", "tok/s", row["fp8_kv_tok_s"],
                              "LLM.generate, FP8 KV cache", peer="LLM.generate, bf16 KV cache",
                              peer_value=row["tok_s"]))
    if "W2" in result:
        row = result["W2"]
        out.append(Figure("W2 (batch 1)", "latency", "ms/token", row["ms_per_token"], "accelerate(model).generate",
                          higher_is_better=False, peer="HF generate, static cache",
                          peer_value=row["hf_static_ms_per_token"]))
    if "drop_in_W1_batch" in result:
        row = result["drop_in_W1_batch"]
        peer = row.get("hf_generate_tok_s")
        out.append(Figure("drop-in W1 batch", "output throughput", "tok/s", row["drop_in_tok_s"],
                          "accelerate(model).generate", peer=f"HF generate ({row['hf_generate_subset']})" if peer
                          else None, peer_value=peer))
    if "W3_0.6b" in result:
        row = result["W3_0.6b"]
        out.append(Figure("W3 (0.6b, 256 requests sharing 2,048 tokens)", "output throughput", "tok/s", row["tok_s"],
                          "LLM.generate, cascade attention", peer="LLM.generate, cascade attention off",
                          peer_value=row["no_cascade_tok_s"]))
        if "second_call_tok_s" in row:
            out.append(Figure("W3 (0.6b, 256 requests sharing 2,048 tokens)", "output throughput after a W3-shaped call",
                              "tok/s", row["second_call_tok_s"], "LLM.generate, cascade attention (graphs captured)",
                              peer="LLM.generate, cascade attention off", peer_value=row["no_cascade_tok_s"]))
        out.append(Figure("W3 (0.6b, 256 requests sharing 2,048 tokens)", "output throughput", "tok/s", row["tok_s"],
                          "LLM.generate, prefix caching", peer="LLM.generate, prefix caching off",
                          peer_value=row["no_prefix_caching_tok_s"]))
    if "W2" in result and "cublas_ms_per_token" in result["W2"]:
        out.append(Figure("W2 (batch 1)", "latency, GEMV kernel vs cuBLAS", "ms/token", result["W2"]["ms_per_token"],
                          "accelerate(model).generate", higher_is_better=False,
                          peer="accelerate(model).generate, projections on cuBLAS",
                          peer_value=result["W2"]["cublas_ms_per_token"]))
    if "W2" in result and "separate_kv_write_ms_per_token" in result["W2"]:
        out.append(Figure("W2 (batch 1)", "latency, K/V written in the rotary launch", "ms/token",
                          result["W2"]["ms_per_token"], "accelerate(model).generate", higher_is_better=False,
                          peer=SEPARATE_KV_WRITE_PEER, peer_value=result["W2"]["separate_kv_write_ms_per_token"]))
    if "W5_8b_batch1" in result:
        row = result["W5_8b_batch1"]
        peer = row.get("cublas_ms_per_token")
        out.append(Figure("W5 (8b, batch 1)", "latency", "ms/token", row["ms_per_token"],
                          "accelerate(model).generate", higher_is_better=False,
                          peer="accelerate(model).generate, projections on cuBLAS" if peer else None,
                          peer_value=peer))
        if "separate_kv_write_ms_per_token" in row:
            out.append(Figure("W5 (8b, batch 1)", "latency, K/V written in the rotary launch", "ms/token",
                              row["ms_per_token"], "accelerate(model).generate", higher_is_better=False,
                              peer=SEPARATE_KV_WRITE_PEER, peer_value=row["separate_kv_write_ms_per_token"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", default=["w1", "w2", "w5"], help="w1 w2 w3 w5 w5b1 (W5 batch 1 alone)")
    parser.add_argument("--hf-cb-requests", type=int, default=64, help="W1 requests given to HF CB (0 = skip)")
    parser.add_argument("--hf-cb-window", type=float, default=30,
                        help="give HF CB all W1 requests and count its tokens over this many seconds (overrides "
                        "--hf-cb-requests for W1; HF's best setting: it gains with batch size); 0: the first "
                        "--hf-cb-requests requests to the end")
    parser.add_argument("--compare-sync", action="store_true", help="also run W1 with async_scheduling=False")
    parser.add_argument("--compare-mixed", action="store_true", help="also run W1 with mixed_steps=False")
    parser.add_argument("--compare-fp8-kv", action="store_true", help="also run W1 with kv_cache_dtype='fp8'")
    parser.add_argument("--hf-subset", type=int, default=32, help="drop-in batch rows given to HF generate")
    parser.add_argument("--w5-hf-requests", type=int, default=16)
    parser.add_argument("--compare-cublas", action="store_true",
                        help="also run W2 and W5 batch 1 with every projection on cuBLAS (the GEMV kernel off)")
    parser.add_argument("--compare-kv-write", action="store_true",
                        help="also run W2 and W5 batch 1 with the store kernel writing K/V (not the rotary launch)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    peers = (("cublas_ms_per_token",) if args.compare_cublas else ()) + (
        ("separate_kv_write_ms_per_token",) if args.compare_kv_write else ())
    results: dict = {"device": torch.cuda.get_device_name(), "commit": commit()}
    table: dict = {}
    jobs = {
        "w1": lambda: w1(table, "0.6b", args.hf_cb_requests, args.hf_cb_window, args.compare_sync,
                         args.compare_mixed, args.compare_fp8_kv),
        "w2": lambda: w2_and_drop_in(table, args.hf_subset, peers),
        "w5": lambda: (w1(table, "8b", args.w5_hf_requests), w5_batch1(table, peers)),
        "w5b1": lambda: w5_batch1(table, peers),
        "w3": lambda: w3(table),
    }
    try:
        for name in args.only:
            try:
                jobs[name]()
            except Exception as error:  # one broken workload must not hide the others' figures
                traceback.print_exc()
                table[f"{name}_error"] = {"error": repr(error)}
                gc.collect()
                torch.cuda.empty_cache()
    finally:
        results.update(table)
        print_table(table)
        finish_run(args.out, results, figures(results), "bench_gpu")


if __name__ == "__main__":
    main()
