"""Tensor parallelism on 2 GPUs: exactness, bf16 agreement, W5 speed at TP=2 vs TP=1, HF peers, communication share.

Parts (``--parts``, default all; each bounded, each failure recorded and skipped):

1. fp32 exactness: a tiny random Qwen3 (weights scaled up so greedy is decisive), 16 prompts of mixed lengths,
   greedy 32 tokens through ``LLM(model, tensor_parallel_size=1)`` and ``=2``: identical token ids?
2. bf16 agreement on trained weights: Qwen3-0.6B architecture trained as a byte-level LM (bf16_agreement.py's
   ``train_byte_lm``, ``--train-steps``), then teacher-forced top-1 through the engine at TP=1 and TP=2: one
   ``max_tokens=1`` greedy request per prefix of K held-out byte sequences (the generated token is the top-1 at that
   position; prefix caching makes it cheap). Agreement fraction TP=2 vs TP=1.
3. W5 (Qwen3-8B architecture, random bf16; DESIGN.md 3): W2's batch-1 latency (128 prompt tokens, 256 new, greedy,
   ms/token) and W1 throughput (the first ``--w1-requests`` of W1's requests, output tok/s) through
   ``LLM(model, tensor_parallel_size=1)`` and ``=2``, each after a warm-up call.
4. Peers: HF ``generate`` on the same model dispatched over both GPUs as ``device_map="auto"`` does (transformers'
   balanced device map, accelerate's ``dispatch_model``), batch 1, dynamic cache and static cache; then, optionally,
   HF tensor parallelism (``tp_plan="auto"`` under ``torchrun --nproc-per-node 2``, on a saved copy).
5. Communication share of a decode step at TP=2: a few decode steps profiled on rank 0 (``torch.profiler``, CUDA
   activity) at batch 1 and 64; communication (NCCL and peer all-reduce) kernel time / all kernel time. If the kernels replayed from CUDA graphs are not
   visible, again with ``enforce_eager=True``.

Execution order is 1, 2, 3, 5, 4: part 5 profiles part 3's TP=2 engine when both run (no second 8B engine), and part
4 moves the model over both GPUs, so it goes last. ``--budget-s`` bounds the optional sub-parts (HF static cache,
HF tensor parallelism, the eager profile): each runs only while enough of the budget is left. The JSON at ``--out``
is rewritten after every measurement, so a run cut short keeps what it measured.

    python3 benchmarks/tp.py --out $OUT/tp.json                   # 2 GPUs
    python3 benchmarks/tp.py --device cpu --tiny --parts 1,2,3,5  # CPU smoke test (gloo), tiny models
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from hf_minivllm import LLM, SamplingParams
from workloads import commit, random_model, w1_requests

START = time.perf_counter()
W2_PROMPT_LEN = 128
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def log(message: str) -> None:
    print(f"[tp {time.perf_counter() - START:6.1f} s] {message}", flush=True)


class Run:
    """The run's arguments, its summary (written to --out after every measurement) and its budget."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device if args.device != "cuda" else "cuda:0")
        self.cuda = self.device.type == "cuda"
        self.summary: dict = {
            "device": torch.cuda.get_device_name(0) if self.cuda else "cpu",
            "commit": commit(),
            "gpus": torch.cuda.device_count() if self.cuda else 0,
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "args": vars(args),
            "parts": {},
        }
        self.model_8b = None  # shared by parts 3, 5 and 4

    def remaining(self) -> float:
        return self.args.budget_s - (time.perf_counter() - START)

    def part(self, name: str) -> dict:
        return self.summary["parts"].setdefault(name, {})

    def save(self) -> None:
        self.summary["elapsed_s"] = time.perf_counter() - START
        if self.args.out:
            Path(self.args.out).write_text(json.dumps(self.summary, indent=2, default=str))

    def finish(self, figures, script: str) -> None:
        """Write the run's JSON; a GPU run's ``figures(summary)`` also go to benchmarks/results (smoke tests are not
        results)."""
        if self.args.tiny or not self.cuda:
            self.save()
        else:
            from results import finish_run

            finish_run(self.args.out, self.summary, figures(self.summary), script)

    def engine(self, **config) -> dict:
        """LLM config for this device: on CPU a small KV cache (the ranks are processes of this machine)."""
        if not self.cuda:
            config.setdefault("cpu_kvcache_space_gib", 0.05)
        return config

    def sync(self) -> None:
        if self.cuda:
            for index in range(torch.cuda.device_count()):
                torch.cuda.synchronize(index)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001
        return "unknown"


def close(llm: LLM | None) -> None:
    if llm is not None:
        llm.close()


def tiny_qwen3(run: Run, vocab: int = 1024, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Hidden 256, 4 layers, 8 heads, 4 KV heads, head_dim 32; weights ~N(0, 0.08) so greedy is not flat."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=4096,
                         rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(run.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.08)
    return model.eval()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def token_ids(llm: LLM, prompts, params) -> list[list[int]]:
    return [out["token_ids"] for out in llm.generate(prompts, params, use_tqdm=False)]


# Part 1 -------------------------------------------------------------------------------------------------------------

def part1_fp32_exactness(run: Run) -> None:
    row = run.part("1_fp32_exactness")
    model = tiny_qwen3(run)
    generator = torch.Generator().manual_seed(0)
    lengths = [1, 3, 7, 15, 16, 17, 31, 33, 64, 100, 127, 128, 129, 200, 255, 300]
    prompts = [torch.randint(3, 1024, (n,), generator=generator).tolist() for n in lengths]
    config = run.engine(max_model_len=512, max_num_seqs=16)
    row.update(model="tiny Qwen3 fp32 (hidden 256, 4 layers, 8/4 heads, head_dim 32, vocab 1024)",
               prompts=len(prompts), new_tokens=32)
    outputs = {}
    for tp in (1, 2):
        llm = None
        try:
            # TP=1 on a copy: its engine re-points the model's q/k/v storage (same values).
            llm = LLM(copy.deepcopy(model) if tp == 1 else model, tensor_parallel_size=tp, **config)
            outputs[tp] = token_ids(llm, prompts, greedy(32))
        finally:
            close(llm)
            llm = None
            run.free()
        log(f"part 1: TP={tp} done")
    matched = sum(a == b for a, b in zip(outputs[1], outputs[2]))
    first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                  for a, b in zip(outputs[1], outputs[2])]
    row.update(identical=outputs[1] == outputs[2], sequences_matched=matched, sequences=len(prompts),
               first_divergence_per_sequence=first_diff)
    model = None
    run.free()


# Part 2 -------------------------------------------------------------------------------------------------------------

def part2_bf16_agreement(run: Run) -> None:
    from bf16_agreement import sample_texts, stdlib_bytes, train_byte_lm

    args, row = run.args, run.part("2_bf16_agreement")
    if args.tiny:
        model = tiny_qwen3(run, dtype=torch.bfloat16)
        row["model"] = "tiny Qwen3 bf16 (smoke test)"
    else:
        model = random_model("0.6b", device=str(run.device))
        row["model"] = "Qwen3-0.6B architecture, bf16"
    steps = args.train_steps if run.cuda else 0  # train_byte_lm runs on CUDA only
    if steps:
        start = time.perf_counter()
        model = train_byte_lm(model, steps)
        row.update(train_steps=steps, train_s=time.perf_counter() - start)
        log(f"part 2: trained {steps} steps in {row['train_s']:.0f} s")
    else:
        row.update(train_steps=0, note="random init (no training on CPU)" if not run.cuda else "random init")
    model = model.to(torch.bfloat16).eval()
    texts = [t.tolist() for t in sample_texts(stdlib_bytes(held_out=True), count=args.agree_seqs,
                                              length=args.agree_len)]
    # One request per prefix tokens[:i], i = 1..L: its single greedy token is the top-1 after position i - 1.
    prompts = [text[:i] for text in texts for i in range(1, len(text) + 1)]
    actual = [text[i] if i < len(text) else None for text in texts for i in range(1, len(text) + 1)]
    config = run.engine(max_model_len=1024, max_num_seqs=256, enforce_eager=True)  # prefill only: no graphs needed
    top1 = {}
    for tp in (1, 2):
        llm = None
        try:
            llm = LLM(copy.deepcopy(model) if tp == 1 else model, tensor_parallel_size=tp, **config)
            start = time.perf_counter()
            top1[tp] = [ids[0] for ids in token_ids(llm, prompts, greedy(1))]
            row[f"tp{tp}_s"] = time.perf_counter() - start
        finally:
            close(llm)
            llm = None
            run.free()
        log(f"part 2: TP={tp} scored {len(prompts)} positions")
    agree = sum(a == b for a, b in zip(top1[1], top1[2]))
    correct = sum(a == b for a, b in zip(top1[1], actual) if b is not None)
    row.update(sequences=len(texts), length=args.agree_len, positions=len(prompts), agreeing=agree,
               agreement=agree / len(prompts), tp1_next_byte_accuracy=correct / sum(a is not None for a in actual))
    model = None
    run.free()


# Part 3 (and 5 on its TP=2 engine) ----------------------------------------------------------------------------------

def big_model(run: Run):
    if run.model_8b is None:
        if run.args.tiny:
            run.model_8b = tiny_qwen3(run, vocab=10240, dtype=torch.bfloat16)
        else:
            run.model_8b = random_model("8b", device=str(run.device))
    return run.model_8b


def w2_prompt(seed: int) -> list[int]:
    return torch.randint(0, 10000, (W2_PROMPT_LEN,), generator=torch.Generator().manual_seed(seed)).tolist()


def batch1_ms(run: Run, llm: LLM, new_tokens: int, repeats: int = 2) -> list[float]:
    """W2: a fresh 128-token prompt per run (no prefix-cache hits), ``new_tokens`` greedy; ms per output token."""
    times = []
    for seed in range(repeats):
        start = run.now()
        out = token_ids(llm, [w2_prompt(seed)], greedy(new_tokens))
        times.append((run.now() - start) * 1000 / len(out[0]))
    return times


def w1_throughput(run: Run, llm: LLM, count: int) -> dict:
    prompts, params = w1_requests()
    if run.args.tiny:
        prompts, params = w1_requests(count, max_input_len=128, max_output_len=128)
    prompts, params = prompts[:count], params[:count]
    start = run.now()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = run.now() - start
    tokens = sum(len(o["token_ids"]) for o in outputs)
    return {"requests": len(prompts), "output_tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def measure_w2_and_w1(run: Run, llm: LLM, row: dict, label: str) -> None:
    """W2 at batch 1 (after a warm-up; best of the runs) and W1's first ``--w1-requests`` requests through ``llm``,
    into ``row`` (``batch1_ms_per_token``, ``batch1_runs_ms``, ``w1``), the JSON saved in between."""
    token_ids(llm, [w2_prompt(100)], greedy(16))  # warm-up
    times = batch1_ms(run, llm, run.args.w2_new_tokens)
    row["batch1_ms_per_token"], row["batch1_runs_ms"] = min(times), times
    log(f"{label}: batch 1 {min(times):.2f} ms/token")
    run.save()
    row["w1"] = w1_throughput(run, llm, run.args.w1_requests)
    log(f"{label}: W1 first {row['w1']['requests']} requests {row['w1']['tok_s']:.0f} tok/s")


def part3_w5(run: Run, profile: bool) -> None:
    args, row = run.args, run.part("3_w5")
    model = big_model(run)
    row.update(model="tiny Qwen3 bf16 (smoke test)" if args.tiny else "Qwen3-8B architecture, random bf16",
               w2=f"batch 1, {W2_PROMPT_LEN} prompt tokens, {args.w2_new_tokens} new, greedy",
               w1=f"first {args.w1_requests} of W1's 256 requests")
    config = run.engine(max_model_len=4096, max_num_seqs=256)
    for tp in (1, 2):
        llm = None
        try:
            llm, build_s = _timed(lambda: LLM(model, tensor_parallel_size=tp, **config))
            row[f"tp{tp}_build_s"] = build_s
            token_ids(llm, [w2_prompt(100)], greedy(16))  # warm-up
            times = batch1_ms(run, llm, args.w2_new_tokens)
            row[f"tp{tp}_batch1_ms_per_token"] = min(times)
            row[f"tp{tp}_batch1_runs_ms"] = times
            log(f"part 3: TP={tp} batch 1 {min(times):.2f} ms/token")
            run.save()
            row[f"tp{tp}_w1"] = w1_throughput(run, llm, args.w1_requests)
            log(f"part 3: TP={tp} W1 {row[f'tp{tp}_w1']['tok_s']:.0f} tok/s")
            run.save()
            if profile:  # TP=1 too: which kernels do not halve at TP=2
                mode = "CUDA graphs" if tp == 2 else "TP=1, CUDA graphs"
                _guarded(run, "5_comm_share", lambda: profile_comm(run, llm, mode, reused_part3=True))
        except Exception as error:  # noqa: BLE001 - TP=1 failing must not keep TP=2 from being measured
            traceback.print_exc()
            row[f"tp{tp}_error"] = repr(error)[:2000]
        finally:
            close(llm)
            llm = None
            run.free()
    if "tp1_batch1_ms_per_token" in row and "tp2_batch1_ms_per_token" in row:
        row["batch1_speedup_tp2_over_tp1"] = row["tp1_batch1_ms_per_token"] / row["tp2_batch1_ms_per_token"]
    if "tp1_w1" in row and "tp2_w1" in row:
        row["w1_throughput_tp2_over_tp1"] = row["tp2_w1"]["tok_s"] / row["tp1_w1"]["tok_s"]


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


# Part 5 -------------------------------------------------------------------------------------------------------------

def _kernel_rows(run: Run, profiler) -> list[tuple[str, float, int]]:
    """(name, self device time in us, calls) of each kernel (memcpy/memset left out); CPU ops on CPU (smoke)."""
    rows = []
    for event in profiler.key_averages():
        if run.cuda:
            time_us = getattr(event, "self_device_time_total", None)
            if time_us is None:
                time_us = getattr(event, "self_cuda_time_total", 0)
        else:
            time_us = event.self_cpu_time_total
        name = event.key
        if time_us and time_us > 0 and not name.startswith(("Memcpy", "Memset")):
            rows.append((name, float(time_us), int(event.count)))
    return rows


def decode_profile(run: Run, llm: LLM, batch: int, steps: int) -> dict:
    """Profile ``steps`` decode steps of ``batch`` requests (prefill run and synchronized before profiling)."""
    engine = llm.engine
    prompts = [[(7 * i + j) % 10000 for j in range(W2_PROMPT_LEN)] for i in range(batch)]
    params = greedy(steps + 8)
    for prompt in prompts:
        engine.add_request(prompt, params)
    engine.step()  # launches the prefill (with async scheduling its tokens come with the next step)
    engine.step()
    run.sync()
    activities = [torch.profiler.ProfilerActivity.CUDA if run.cuda else torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as profiler:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        run.sync()
        wall_s = time.perf_counter() - start
    while engine.has_unfinished():
        engine.step()
    run.sync()
    rows = _kernel_rows(run, profiler)
    total = sum(t for _, t, _ in rows)
    # Communication: NCCL's kernels and our peer all-reduce kernel (small tensors, hf_minivllm.kernels.all_reduce).
    comm = [(name, t, n) for name, t, n in rows if "nccl" in name.lower() or "all_reduce" in name.lower()]
    comm_total = sum(t for _, t, _ in comm)
    layers = len(llm.model.layers) if hasattr(llm.model, "layers") else 0
    top = sorted(rows, key=lambda r: -r[1])[:16]
    return {
        "batch": batch, "steps": steps, "wall_ms_per_step": wall_s * 1000 / steps,
        "kernel_ms_per_step": total / 1000 / steps, "comm_ms_per_step": comm_total / 1000 / steps,
        "comm_share": comm_total / total if total else None, "comm_calls": sum(n for _, _, n in comm),
        # Two all-reduces per layer per step (attention and MLP outputs): seen at least half of them means the
        # kernels replayed from CUDA graphs are visible to the profiler.
        "graph_kernels_visible": sum(n for _, _, n in comm) >= layers * steps if layers else None,
        "kernels": len(rows), "top_kernels": [{"name": name[:120], "us": t, "calls": n} for name, t, n in top],
    }


def profile_comm(run: Run, llm: LLM, mode: str, reused_part3: bool = False) -> None:
    row = run.part("5_comm_share")
    row.setdefault("note", "rank 0 only; communication kernels (NCCL, peer all-reduce) include waiting for the other rank")
    results = row.setdefault(mode, {})
    if reused_part3:
        results["engine"] = "part 3's engine (max_num_seqs 256)"
    for batch in (1, 64) if not run.args.tiny else (1, 4):
        results[f"batch_{batch}"] = decode_profile(run, llm, batch, run.args.profile_steps)
        share = results[f"batch_{batch}"]["comm_share"]
        log(f"part 5 ({mode}): batch {batch} communication share {share if share is None else f'{share:.3f}'}")
        run.save()


def part5_comm_share(run: Run) -> None:
    row = run.part("5_comm_share")
    config = run.engine(max_model_len=4096, max_num_seqs=64)
    if "CUDA graphs" not in row:
        row.pop("error", None)  # a failed attempt on part 3's engine: start over on one of our own
        llm = None
        try:
            llm = LLM(big_model(run), tensor_parallel_size=2, **config)
            profile_comm(run, llm, "CUDA graphs")
        finally:
            close(llm)
            llm = None
            run.free()
    graphs = row.get("CUDA graphs", {})
    visible = all(graphs.get(f"batch_{b}", {}).get("graph_kernels_visible") for b in (1, 64)) if run.cuda else True
    if (visible and not run.args.eager_profile) or "eager" in row:
        return
    if run.remaining() < 90:
        row["eager"] = {"skipped": f"only {run.remaining():.0f} s of the budget left"}
        return
    row["eager_reason"] = "--eager-profile" if visible else "kernels inside CUDA graphs not visible to the profiler"
    llm = None
    try:
        llm = LLM(big_model(run), tensor_parallel_size=2, enforce_eager=True, **config)
        profile_comm(run, llm, "eager")
    finally:
        close(llm)
        llm = None
        run.free()


# Part 4 -------------------------------------------------------------------------------------------------------------

def dispatch_auto(model) -> dict:
    """Spread ``model`` over the visible GPUs as ``from_pretrained(device_map="auto")`` would: transformers'
    balanced max memory and device map, then accelerate's ``dispatch_model`` (moves the modules, adds hooks)."""
    from accelerate import dispatch_model

    try:
        from transformers.integrations.accelerate import get_balanced_memory, infer_auto_device_map
    except ImportError:
        from accelerate.utils import get_balanced_memory, infer_auto_device_map
    no_split = list(model._no_split_modules or [])
    max_memory = get_balanced_memory(model, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    dispatch_model(model, device_map=device_map)
    return device_map


def hf_batch1_ms(run: Run, model, new_tokens: int, **settings) -> float:
    device = model.get_input_embeddings().weight.device
    prompt = torch.tensor([w2_prompt(0)], device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **settings)
    with torch.no_grad():
        start = run.now()
        out = model.generate(prompt, **kwargs)
        elapsed = run.now() - start
    return elapsed * 1000 / (out.shape[1] - prompt.shape[1])


def part4_peers(run: Run) -> None:
    args, row = run.args, run.part("4_peers")
    model = big_model(run)
    new_tokens = args.w2_new_tokens
    row["w2"] = f"batch 1, {W2_PROMPT_LEN} prompt tokens, {new_tokens} new, greedy (min_new_tokens)"
    if run.cuda and torch.cuda.device_count() >= 2:
        device_map = dispatch_auto(model)
        counts: dict[str, int] = {}
        for where in device_map.values():
            counts[str(where)] = counts.get(str(where), 0) + 1
        row["device_map"] = {"modules_per_device": counts, "map": {k: str(v) for k, v in device_map.items()}}
        log(f"part 4: dispatched over GPUs: {counts}")
    else:
        row["device_map"] = "not dispatched (one device; smoke test)"
    run.save()

    hf_batch1_ms(run, model, 8)  # warm-up
    row["hf_device_map_dynamic_ms_per_token"] = hf_batch1_ms(run, model, new_tokens)
    log(f"part 4: HF device_map dynamic cache {row['hf_device_map_dynamic_ms_per_token']:.2f} ms/token")
    run.save()
    if args.no_hf_static or not run.cuda:
        row["hf_device_map_static"] = {"skipped": "--no-hf-static" if run.cuda else "CPU smoke test"}
    elif run.remaining() < args.hf_static_min_s:
        row["hf_device_map_static"] = {"skipped": f"only {run.remaining():.0f} s of the budget left"}
    else:
        try:
            # The first call compiles (HF auto-compiles the forward with a static cache); same length, so no
            # recompilation for the timed call.
            _, row["hf_static_first_call_s"] = _timed(lambda: hf_batch1_ms(run, model, new_tokens,
                                                                           cache_implementation="static"))
            row["hf_device_map_static_ms_per_token"] = hf_batch1_ms(run, model, new_tokens,
                                                                    cache_implementation="static")
            row["hf_static_compiled"] = getattr(model, "_compiled_call", None) is not None
            log(f"part 4: HF device_map static cache {row['hf_device_map_static_ms_per_token']:.2f} ms/token")
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            row["hf_device_map_static"] = {"error": repr(error)[:2000]}
    run.save()

    if hasattr(model, "_compiled_call"):
        model._compiled_call = None
    torch._dynamo.reset()  # compiled graphs hold the model's weights

    hf_tp = row.setdefault("hf_tp", {"cache": "dynamic", "new_tokens": args.hf_tp_new_tokens})
    folder = None
    if args.no_hf_tp or not run.cuda or torch.cuda.device_count() < 2:
        hf_tp["skipped"] = "--no-hf-tp" if args.no_hf_tp else "needs 2 GPUs"
    elif run.remaining() < args.hf_tp_min_s:
        hf_tp["skipped"] = f"only {run.remaining():.0f} s of the budget left"
    else:
        folder = tempfile.mkdtemp(prefix="tp-hf-8b-", dir=args.tmp_dir)
        try:
            start = time.perf_counter()
            with torch.no_grad():  # our TP=1 engine left q/k/v (and gate/up) as views of one storage: unshare them
                for param in model.parameters():
                    param.data = param.data.clone()
            model.save_pretrained(folder)
            hf_tp["save_s"] = time.perf_counter() - start
            log(f"part 4: saved the model for HF TP in {hf_tp['save_s']:.0f} s")
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            hf_tp["error"] = f"saving the model failed: {error!r}"[:2000]
            shutil.rmtree(folder, ignore_errors=True)
            folder = None
        run.save()
    run.model_8b = None
    model = None
    run.free()  # the torchrun ranks get both GPUs to themselves
    if folder is not None:
        try:
            hf_tp.update(hf_tensor_parallel(run, folder))
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def hf_tensor_parallel(run: Run, folder: str) -> dict:
    """HF's own tensor parallelism on the saved model under torchrun (2 processes), batch 1, dynamic cache."""
    result: dict = {}
    out_path = os.path.join(folder, "hf_tp_result.json")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               os.path.abspath(__file__), "--hf-tp-worker", folder, "--hf-tp-out", out_path,
               "--hf-tp-new-tokens", str(run.args.hf_tp_new_tokens)]
    timeout = max(10.0, min(run.args.hf_tp_timeout_s, run.remaining() - 10))
    env = {**os.environ, **NCCL_ENV, "OMP_NUM_THREADS": "4"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent), env.get("PYTHONPATH", "")])
    log(f"part 4: HF tp_plan=auto under torchrun (time limit {timeout:.0f} s)")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    start = time.perf_counter()
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and its two ranks (a session of their own)
        output, _ = process.communicate()
        result["error"] = f"timed out after {timeout:.0f} s"
    result["torchrun_s"] = time.perf_counter() - start
    if os.path.exists(out_path):
        if "error" in result:  # the ranks had written their result and were stuck tearing down
            result["note"] = result.pop("error") + ", after its result was written"
        result.update(json.loads(Path(out_path).read_text()))
        log(f"part 4: HF tp_plan=auto {result['ms_per_token']:.2f} ms/token")
    else:
        result.setdefault("error", f"torchrun exited {process.returncode} without a result")
        result["output_tail"] = (output or "")[-3000:]
        log(f"part 4: HF TP failed: {result['error']}")
    return result


def hf_tp_worker(folder: str, out_path: str, new_tokens: int) -> None:
    """One torchrun rank: load the saved model with ``tp_plan="auto"``, time batch-1 ``generate`` (dynamic cache)."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    try:  # transformers >= 5.17 takes the plan in a DistributedConfig (tp_plan= alone is deprecated there)
        from transformers import DistributedConfig

        placement = {"distributed_config": DistributedConfig(tp_plan="auto")}
    except ImportError:
        placement = {"tp_plan": "auto"}
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, local_files_only=True,
                                                 **placement).eval()
    load_s = time.perf_counter() - start
    rank = dist.get_rank() if dist.is_initialized() else 0
    prompt = torch.tensor([w2_prompt(0)], device=f"cuda:{local_rank}" if cuda else "cpu")

    def generate(tokens: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        begin = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 pad_token_id=0)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - begin) * 1000 / (out.shape[1] - prompt.shape[1])

    generate(8)  # warm-up
    ms = generate(new_tokens)
    if rank == 0:
        Path(out_path).write_text(json.dumps({"load_s": load_s, "ms_per_token": ms, "placement": list(placement),
                                              "world_size": dist.get_world_size() if dist.is_initialized() else 1}))
    print(f"hf tp rank {rank}: load {load_s:.1f} s, {ms:.2f} ms/token", flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# Summary, figures ---------------------------------------------------------------------------------------------------

def figures(result: dict) -> list:
    """The run's figures for benchmarks/results (see results.py)."""
    from results import Figure

    parts, out = result.get("parts", {}), []
    exact = parts.get("1_fp32_exactness", {})
    if "sequences_matched" in exact:
        out.append(Figure("TP exactness (tiny Qwen3, fp32, 16 prompts, greedy 32)",
                          "greedy sequences identical to TP=1", "fraction",
                          exact["sequences_matched"] / exact["sequences"], "LLM, TP=2"))
    agree = parts.get("2_bf16_agreement", {})
    if "agreement" in agree:
        out.append(Figure(f"TP bf16 agreement (0.6b byte LM, {agree.get('train_steps')} steps, "
                          f"{agree['positions']} positions)", "teacher-forced top-1 agreement with TP=1", "fraction",
                          agree["agreement"], "LLM, TP=2"))
    w5 = parts.get("3_w5", {})
    peers = parts.get("4_peers", {})
    tp2_ms = w5.get("tp2_batch1_ms_per_token")
    if tp2_ms:
        workload = "W5 (8b, batch 1)"
        if w5.get("tp1_batch1_ms_per_token"):
            out.append(Figure(workload, "latency, TP=2 vs TP=1", "ms/token", tp2_ms, "LLM, TP=2",
                              higher_is_better=False, peer="LLM, TP=1 (one GPU)",
                              peer_value=w5["tp1_batch1_ms_per_token"]))
        static, dynamic = peers.get("hf_device_map_static_ms_per_token"), peers.get("hf_device_map_dynamic_ms_per_token")
        if static or dynamic:
            out.append(Figure(workload, "latency, TP=2 vs HF device_map=auto", "ms/token", tp2_ms, "LLM, TP=2",
                              higher_is_better=False,
                              peer=f"HF generate, device_map=auto over 2 GPUs, {'static' if static else 'dynamic'} "
                              "cache", peer_value=static or dynamic))
        hf_tp = peers.get("hf_tp", {})
        if isinstance(hf_tp, dict) and hf_tp.get("ms_per_token"):
            out.append(Figure(workload, "latency, TP=2 vs HF tp_plan=auto", "ms/token", tp2_ms, "LLM, TP=2",
                              higher_is_better=False, peer="HF generate, tp_plan=auto (torchrun, 2 GPUs), dynamic "
                              "cache", peer_value=hf_tp["ms_per_token"]))
    if "tp2_w1" in w5:
        row = w5["tp2_w1"]
        out.append(Figure(f"W5 (8b, first {row['requests']} W1 requests)", "output throughput, TP=2 vs TP=1",
                          "tok/s", row["tok_s"], "LLM, TP=2", peer="LLM, TP=1 (one GPU)",
                          peer_value=w5.get("tp1_w1", {}).get("tok_s")))
    comm = parts.get("5_comm_share", {})
    for mode in ("CUDA graphs", "eager"):
        for batch in (1, 64):
            share = comm.get(mode, {}).get(f"batch_{batch}", {}).get("comm_share")
            if share is not None:
                out.append(Figure(f"W5 (8b) TP=2 decode step, batch {batch}", "communication share of rank-0 kernel time",
                                  "fraction", share, f"LLM, TP=2 ({mode})", higher_is_better=False))
    return out


def print_summary(run: Run) -> None:
    parts = run.summary["parts"]
    print(f"\n== tp.py: {run.summary['device']} x{run.summary['gpus']}, torch {run.summary['torch']}, transformers "
          f"{run.summary['transformers']}, commit {run.summary['commit']}, {time.perf_counter() - START:.0f} s",
          flush=True)

    def line(label: str, value) -> None:
        print(f"   {label:48s} {value}", flush=True)

    for name, row in parts.items():
        for key, value in row.items():
            if isinstance(value, dict) and "error" in value:
                key, value = f"{key}.error", value["error"]
            if key == "error" or key.endswith("error"):
                line(f"part {name}: {key}", f"ERROR {str(value)[:200]}")
    p1 = parts.get("1_fp32_exactness", {})
    if "sequences_matched" in p1:
        line("1 fp32 TP=2 vs TP=1 identical sequences", f"{p1['sequences_matched']}/{p1['sequences']} "
             f"(identical: {p1['identical']})")
    p2 = parts.get("2_bf16_agreement", {})
    if "agreement" in p2:
        line("2 bf16 top-1 agreement TP=2 vs TP=1", f"{p2['agreement']:.4f} ({p2['agreeing']}/{p2['positions']}, "
             f"{p2['train_steps']} train steps, TP=1 next-byte acc {p2['tp1_next_byte_accuracy']:.3f})")
    p3 = parts.get("3_w5", {})
    for tp in (1, 2):
        if f"tp{tp}_batch1_ms_per_token" in p3:
            line(f"3 W5 batch 1 TP={tp}", f"{p3[f'tp{tp}_batch1_ms_per_token']:.2f} ms/token")
    for tp in (1, 2):
        if f"tp{tp}_w1" in p3:
            w1 = p3[f"tp{tp}_w1"]
            line(f"3 W5 W1 ({w1['requests']} req) TP={tp}", f"{w1['tok_s']:.0f} tok/s ({w1['seconds']:.1f} s)")
    if "batch1_speedup_tp2_over_tp1" in p3:
        line("3 TP2/TP1: batch-1 speed-up, W1 throughput ratio",
             f"{p3['batch1_speedup_tp2_over_tp1']:.2f}x, {p3.get('w1_throughput_tp2_over_tp1', float('nan')):.2f}x")
    p4 = parts.get("4_peers", {})
    for key, label in (("hf_device_map_dynamic_ms_per_token", "4 HF device_map=auto, dynamic cache"),
                       ("hf_device_map_static_ms_per_token", "4 HF device_map=auto, static cache")):
        if key in p4:
            line(label, f"{p4[key]:.2f} ms/token")
    hf_tp = p4.get("hf_tp")
    if isinstance(hf_tp, dict):
        line("4 HF tp_plan=auto (torchrun), dynamic cache", f"{hf_tp['ms_per_token']:.2f} ms/token"
             if "ms_per_token" in hf_tp else hf_tp.get("error") or hf_tp.get("skipped"))
    p5 = parts.get("5_comm_share", {})
    for mode in ("CUDA graphs", "eager"):
        for key, value in p5.get(mode, {}).items():
            if isinstance(value, dict) and value.get("comm_share") is not None:
                line(f"5 comm share, {mode}, {key}", f"{value['comm_share']:.3f} ({value['comm_ms_per_step']:.3f} of "
                     f"{value['kernel_ms_per_step']:.3f} ms kernel time/step, wall {value['wall_ms_per_step']:.3f} ms,"
                     f" graph kernels visible: {value['graph_kernels_visible']})")


def _guarded(run: Run, name: str, fn) -> None:
    """Run one part; an exception is recorded in its row and the run goes on."""
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - one broken part must not hide the others' figures
        traceback.print_exc()
        run.part(name)["error"] = repr(error)[:2000]
        run.model_8b = None if name in ("4_peers",) else run.model_8b
    finally:
        run.free()
        run.save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results here as JSON (rewritten after every measurement)")
    parser.add_argument("--parts", default="1,2,3,4,5", help="comma-separated parts to run (1-5)")
    parser.add_argument("--device", default="cuda", help="cuda (rank 0 on cuda:0) or cpu (smoke test, gloo)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and workloads everywhere (smoke test)")
    parser.add_argument("--budget-s", type=float, default=500.0,
                        help="wall seconds the whole run should take; optional sub-parts are skipped near its end")
    parser.add_argument("--train-steps", type=int, default=200, help="part 2: byte-LM training steps (~0.24 s each on "
                        "an H100)")
    parser.add_argument("--agree-seqs", type=int, default=4, help="part 2: held-out byte sequences")
    parser.add_argument("--agree-len", type=int, default=256, help="part 2: bytes per sequence (one request each)")
    parser.add_argument("--w2-new-tokens", type=int, default=256, help="parts 3/4: batch-1 new tokens (W2: 256)")
    parser.add_argument("--w1-requests", type=int, default=256, help="part 3: the first N of W1's 256 requests")
    parser.add_argument("--profile-steps", type=int, default=16, help="part 5: decode steps profiled per batch size")
    parser.add_argument("--eager-profile", action="store_true", help="part 5: also profile an enforce_eager engine")
    parser.add_argument("--no-hf-static", action="store_true", help="part 4: skip HF's static cache (compiles)")
    parser.add_argument("--hf-static-min-s", type=float, default=150.0,
                        help="part 4: run HF static cache only with this much budget left")
    parser.add_argument("--no-hf-tp", action="store_true", help="part 4: skip HF tp_plan=auto under torchrun")
    parser.add_argument("--hf-tp-min-s", type=float, default=100.0,
                        help="part 4: run HF tensor parallelism only with this much budget left")
    parser.add_argument("--hf-tp-timeout-s", type=float, default=150.0, help="part 4: torchrun time limit")
    parser.add_argument("--hf-tp-new-tokens", type=int, default=128, help="part 4: HF TP batch-1 new tokens")
    parser.add_argument("--tmp-dir", default=None, help="where HF TP's saved model copy goes (default: $TMPDIR)")
    parser.add_argument("--hf-tp-worker", help=argparse.SUPPRESS)
    parser.add_argument("--hf-tp-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_tp_worker:
        hf_tp_worker(args.hf_tp_worker, args.hf_tp_out, args.hf_tp_new_tokens)
        return
    if args.tiny:
        args.train_steps = min(args.train_steps, 20)
        args.agree_seqs, args.agree_len = min(args.agree_seqs, 2), min(args.agree_len, 48)
        args.w2_new_tokens, args.w1_requests, args.profile_steps = 16, min(args.w1_requests, 4), 4
    parts = {int(p) for p in args.parts.split(",") if p.strip()}
    run = Run(args)
    log(f"{run.summary['device']} x{run.summary['gpus']}, torch {torch.__version__}, commit {run.summary['commit']}, "
        f"parts {sorted(parts)}")
    run.save()
    try:
        if 1 in parts:
            _guarded(run, "1_fp32_exactness", lambda: part1_fp32_exactness(run))
            log("part 1 done")
        if 2 in parts:
            _guarded(run, "2_bf16_agreement", lambda: part2_bf16_agreement(run))
            log("part 2 done")
        if 3 in parts:
            _guarded(run, "3_w5", lambda: part3_w5(run, profile=5 in parts))
            log("part 3 done")
        if 5 in parts:
            _guarded(run, "5_comm_share", lambda: part5_comm_share(run))
            log("part 5 done")
        if 4 in parts:
            _guarded(run, "4_peers", lambda: part4_peers(run))
            log("part 4 done")
    finally:
        run.model_8b = None
        run.summary["elapsed_s"] = time.perf_counter() - START
        print_summary(run)
        run.finish(figures, "tp")


if __name__ == "__main__":
    main()
