"""Qwen3-MoE on one GPU: the Qwen3-30B-A3B architecture (48 layers, hidden 2048, 32 heads, 4 KV heads, head_dim 128,
128 experts, top-8, expert width 768; random bf16, 61 GB, built on the GPU) served by ``LLM(model)`` through the
Triton fused MoE, beside transformers' own paths on the same model.

Parts, in this order (each failure recorded, the run goes on; the JSON at ``--out`` is rewritten after every
measurement):

1. ours: W2 (batch 1, 128 prompt tokens, 256 new, greedy: ms/token) and the first ``--w1-requests`` W1 requests
   (output tok/s), each after a warm-up call.
2. bf16 agreement: teacher-forced top-1 over ``--agree-seqs`` x ``--agree-len`` random tokens: our engine's prefill
   forward (bf16) against HF's own forward (bf16, sdpa), and HF sdpa against HF eager attention (the noise floor of
   bf16 rounding alone; a random-init model's logits are nearly flat, so the floor is well below 1).
3. HF continuous batching (``bench_gpu.hf_continuous_batching``) on the same W1 requests for at most
   ``--hf-cb-window-s`` (an upper bound on its whole-run rate: all requests are in flight at first).
4. HF ``generate`` batch 1: dynamic cache over ``--hf-w2-new-tokens``, then the static cache (the first call
   compiles; run only while ``--hf-static-min-s`` of the budget is left, a failure is recorded).

    python3 benchmarks/moe.py --out $OUT/moe.json    # one GPU (80 GB)
    python3 benchmarks/moe.py --device cpu --tiny    # CPU smoke test, a tiny Qwen3-MoE (no HF CB or static cache)
"""
from __future__ import annotations

import argparse
import time
import traceback

import torch

from bf16_agreement import engine_logits, sample_texts
from hf_minivllm import LLM
from tp import Run, _guarded, _timed, close, hf_batch1_ms, log, measure_w2_and_w1
from workloads import w1_requests


def qwen3_moe_config(tiny: bool):
    """Qwen3-30B-A3B's architecture (its published config), or a tiny one with the same structure."""
    from transformers import Qwen3MoeConfig

    common = dict(max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6, norm_topk_prob=True,
                  tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645, decoder_sparse_step=1,
                  mlp_only_layers=[])
    if tiny:
        return Qwen3MoeConfig(vocab_size=10240, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=16,
                              num_experts_per_tok=4, moe_intermediate_size=64,
                              **{**common, "bos_token_id": 1, "eos_token_id": 2})
    return Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8, moe_intermediate_size=768, **common)


def build_model(run: Run):
    """Random bf16 weights built directly on the device (the tiny one scaled up so its greedy is not flat)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(run.device):
        model = AutoModelForCausalLM.from_config(qwen3_moe_config(run.args.tiny), dtype=torch.bfloat16)
    if run.args.tiny:
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() > 1:
                    param.normal_(0.0, 0.08)
    row = run.part("model")
    row.update(architecture="tiny Qwen3-MoE" if run.args.tiny else "Qwen3-30B-A3B", dtype="bfloat16",
               parameters=sum(p.numel() for p in model.parameters()),
               experts_implementation=model.config._experts_implementation)
    return model.eval()


def first_w1(run: Run) -> tuple[list, list]:
    prompts, params = (w1_requests(max_input_len=128, max_output_len=128) if run.args.tiny else w1_requests())
    return prompts[:run.args.w1_requests], params[:run.args.w1_requests]


def teacher_forced_agreement(run: Run, llm: LLM, model) -> dict:
    """Top-1 agreement, ours vs HF bf16 and HF sdpa vs HF eager, over all positions of random token sequences.

    ``engine_logits`` writes a fresh prefill's KV from block 0 on: run it last on an engine (blocks there may hold
    prefix-cached prompts), and never generate with that engine afterwards."""
    args = run.args
    texts = [text % model.config.vocab_size for text in sample_texts(None, count=args.agree_seqs,
                                                                      length=args.agree_len)]
    device = model.get_input_embeddings().weight.device
    top1: dict[str, list[torch.Tensor]] = {"ours": [], "hf_sdpa": [], "hf_eager": []}
    attention = model.config._attn_implementation
    with torch.no_grad():
        for tokens in texts:
            top1["ours"].append(engine_logits(llm, tokens).argmax(-1).cpu())
            top1["hf_sdpa"].append(model(tokens[None].to(device)).logits[0].argmax(-1).cpu())
        model.set_attn_implementation("eager")
        try:
            for tokens in texts:
                top1["hf_eager"].append(model(tokens[None].to(device)).logits[0].argmax(-1).cpu())
        finally:
            model.set_attn_implementation(attention)
    joined = {name: torch.cat(values) for name, values in top1.items()}
    agree = lambda a, b: float((joined[a] == joined[b]).float().mean())  # noqa: E731
    return {"sequences": len(texts), "positions": int(joined["ours"].numel()), "hf_attention": attention,
            "ours_vs_hf_bf16": agree("ours", "hf_sdpa"), "hf_sdpa_vs_hf_eager": agree("hf_sdpa", "hf_eager"),
            "ours_vs_hf_eager": agree("ours", "hf_eager")}


def serve(run: Run, model) -> None:
    """Parts 1 and 2 on one ``LLM(model)`` (TP=1: the engine shares the model's weights)."""
    args, row = run.args, run.part("ours")
    llm = None
    try:
        llm, row["build_s"] = _timed(lambda: LLM(model, **run.engine(max_model_len=4096, max_num_seqs=256)))
        log(f"ours: engine built in {row['build_s']:.1f} s")
        row["w2_new_tokens"] = args.w2_new_tokens
        measure_w2_and_w1(run, llm, row, "ours")
        run.save()
        agreement = run.part("bf16_agreement")
        agreement.update(teacher_forced_agreement(run, llm, model))
        log(f"bf16 agreement: ours vs HF {agreement['ours_vs_hf_bf16']:.4f}, HF sdpa vs eager "
            f"{agreement['hf_sdpa_vs_hf_eager']:.4f} over {agreement['positions']} positions")
    finally:
        close(llm)
        llm = None
        run.free()


def hf_cb(run: Run, model) -> None:
    from bench_gpu import hf_continuous_batching

    row = run.part("hf_continuous_batching")
    if not run.cuda:
        row["skipped"] = "CPU smoke test (CUDA graphs)"
        return
    prompts, params = first_w1(run)
    window = max(10.0, min(run.args.hf_cb_window_s, run.remaining() - 60))
    tokens, seconds = hf_continuous_batching(model, prompts, params, window_s=window)
    row.update(requests=len(prompts), window_s=window, output_tokens=tokens, seconds=seconds, tok_s=tokens / seconds)
    log(f"HF CB: {row['tok_s']:.0f} tok/s ({tokens} tokens in {seconds:.0f} s, window {window:.0f} s)")


def hf_batch1(run: Run, model) -> None:
    args, row = run.args, run.part("hf_generate_batch1")
    hf_batch1_ms(run, model, 8)  # warm-up
    row["dynamic_new_tokens"] = args.hf_w2_new_tokens
    row["dynamic_ms_per_token"] = hf_batch1_ms(run, model, args.hf_w2_new_tokens)
    log(f"HF generate, dynamic cache: {row['dynamic_ms_per_token']:.2f} ms/token")
    run.save()
    if not run.cuda:
        row["static"] = {"skipped": "CPU smoke test (torch.compile)"}
        return
    if run.remaining() < args.hf_static_min_s:
        row["static"] = {"skipped": f"only {run.remaining():.0f} s of the budget left"}
        return
    try:
        # The first call compiles (HF compiles the forward with a static cache); the second, same length, is timed.
        _, row["static_first_call_s"] = _timed(lambda: hf_batch1_ms(run, model, args.w2_new_tokens,
                                                                    cache_implementation="static"))
        run.save()
        row["static_ms_per_token"] = hf_batch1_ms(run, model, args.w2_new_tokens, cache_implementation="static")
        row["static_compiled"] = getattr(model, "_compiled_call", None) is not None
        log(f"HF generate, static cache: {row['static_ms_per_token']:.2f} ms/token")
    except Exception as error:  # noqa: BLE001 - a failed compile is a result too
        traceback.print_exc()
        row["static"] = {"error": repr(error)[:2000]}


def figures(result: dict) -> list:
    """The run's figures for benchmarks/results (see results.py)."""
    from results import Figure

    parts, out = result.get("parts", {}), []
    ours, hf = parts.get("ours", {}), parts.get("hf_generate_batch1", {})
    if ours.get("batch1_ms_per_token"):
        static = hf.get("static_ms_per_token")
        peer = "HF generate, static cache" if static else "HF generate, dynamic cache"
        out.append(Figure("W2 (Qwen3-30B-A3B MoE, batch 1)", "latency", "ms/token", ours["batch1_ms_per_token"],
                          "LLM", higher_is_better=False, peer=peer,
                          peer_value=static or hf.get("dynamic_ms_per_token")))
    if "w1" in ours:
        cb = parts.get("hf_continuous_batching", {})
        peer = (f"HF continuous batching, same requests, first {cb['window_s']:.0f} s (upper bound)"
                if cb.get("tok_s") else None)
        out.append(Figure(f"W1 (Qwen3-30B-A3B MoE, first {ours['w1']['requests']} requests)", "output throughput",
                          "tok/s", ours["w1"]["tok_s"], "LLM", peer=peer, peer_value=cb.get("tok_s")))
    agreement = parts.get("bf16_agreement", {})
    if "ours_vs_hf_bf16" in agreement:
        out.append(Figure("bf16 agreement (Qwen3-30B-A3B MoE, random init)", "teacher-forced top-1 vs HF bf16",
                          "fraction", agreement["ours_vs_hf_bf16"], "LLM", peer="HF sdpa vs HF eager (noise floor)",
                          peer_value=agreement["hf_sdpa_vs_hf_eager"]))
    return out


def print_summary(run: Run) -> None:
    print(f"\n== moe.py: {run.summary['device']}, commit {run.summary['commit']}, "
          f"{time.perf_counter() - run.started:.0f} s", flush=True)
    for name, row in run.summary["parts"].items():
        shown = {key: value for key, value in row.items() if not isinstance(value, (list, dict))}
        print(f"   {name}: {shown}", flush=True)
        for key, value in row.items():
            if isinstance(value, dict):
                print(f"      {key}: {value}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results here as JSON (rewritten after every measurement)")
    parser.add_argument("--device", default="cuda", help="cuda (cuda:0) or cpu (smoke test)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and workload (smoke test)")
    parser.add_argument("--budget-s", type=float, default=560.0, help="wall seconds for the whole run; bounds the "
                        "HF continuous-batching window and decides whether HF's static cache runs")
    parser.add_argument("--w2-new-tokens", type=int, default=256, help="batch-1 new tokens (W2: 256)")
    parser.add_argument("--w1-requests", type=int, default=128, help="the first N of W1's 256 requests")
    parser.add_argument("--agree-seqs", type=int, default=4)
    parser.add_argument("--agree-len", type=int, default=500)
    parser.add_argument("--hf-cb-window-s", type=float, default=90.0, help="HF continuous batching: seconds at most")
    parser.add_argument("--hf-w2-new-tokens", type=int, default=64, help="HF batch 1, dynamic cache: new tokens")
    parser.add_argument("--hf-static-min-s", type=float, default=150.0,
                        help="run HF's static cache (compiles) only with this much budget left")
    parser.add_argument("--no-hf", action="store_true", help="skip HF's continuous batching and generate")
    args = parser.parse_args()
    if args.tiny:
        args.w2_new_tokens, args.hf_w2_new_tokens, args.w1_requests = 16, 8, min(args.w1_requests, 4)
        args.agree_seqs, args.agree_len = min(args.agree_seqs, 2), min(args.agree_len, 64)
    run = Run(args)
    run.started = time.perf_counter()
    log(f"{run.summary['device']}, torch {torch.__version__}, commit {run.summary['commit']}")
    model = None
    try:
        model, run.part("model")["build_s"] = _timed(lambda: build_model(run))
        log(f"model built in {run.part('model')['build_s']:.1f} s")
        run.save()
        _guarded(run, "ours", lambda: serve(run, model))
        if not args.no_hf:
            _guarded(run, "hf_continuous_batching", lambda: hf_cb(run, model))
            _guarded(run, "hf_generate_batch1", lambda: hf_batch1(run, model))
    except Exception:  # noqa: BLE001 - whatever was measured is still written
        traceback.print_exc()
    finally:
        model = None
        print_summary(run)
        run.finish(figures, "moe")


if __name__ == "__main__":
    main()
