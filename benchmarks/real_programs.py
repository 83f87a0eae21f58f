"""Generation inside real programs, on the GPU: memory over a program's life, models and training sharing the GPU,
many short calls, and a thread pool (W7). Every figure is measured here, beside its peer, in the same process.

- memory: device memory in use (as the driver counts it: what other processes and models cannot have) after
  ``accelerate`` and before any call, at its peak during W2 and during W1's 256 prompts as one padded batch, and
  after each call returns; the same for a resident ``LLM`` (vLLM-style pre-allocation) beside it.
- two accelerated Qwen3-0.6B-architecture models alternating calls, then a training step (AdamW) on one of them.
- 200 short calls (batch 1, 32 new tokens) through ``accelerate(model).generate``: ms per token beside W2, with the
  number of KV-cache growths and graph captures they caused.
- W7: 64 threads, each sending W1 requests one at a time through ``generate`` (batch 1), against the same requests
  as one ``LLM.generate`` batch, and against unpatched HF ``generate`` in the same 64 threads (over a time window).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import hf_minivllm
from hf_minivllm import LLM, SamplingParams
from hf_minivllm.patches.state import state_of
from workloads import random_model, w1_requests

GIB = 1 << 30


def now() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def used_gib() -> float:
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return (total - free) / GIB


class PeakMemory:
    """Samples device memory in use every millisecond on a thread while the block runs; ``peak`` in GiB."""

    def __enter__(self) -> PeakMemory:
        self.peak, self._stop = used_gib(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        torch.cuda.set_device(0)
        while not self._stop.wait(0.001):
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, (total - free) / GIB)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, used_gib())


def padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids.cuda(), mask.cuda()


W2_PROMPT_SEED = 0


def w2_prompt() -> torch.Tensor:
    return torch.randint(0, 10000, (1, 128), generator=torch.Generator().manual_seed(W2_PROMPT_SEED)).cuda()


def memory(results: dict) -> None:
    gc.collect()
    torch.cuda.empty_cache()
    start = used_gib()
    model = random_model("0.6b")
    weights = used_gib() - start
    hf_minivllm.accelerate(model, max_model_len=4096)
    after_accelerate = used_gib() - start
    settings = dict(max_new_tokens=256, min_new_tokens=256, do_sample=False)
    with PeakMemory() as w2:
        model.generate(w2_prompt(), **settings)
    after_w2 = used_gib() - start
    ids, mask = padded(w1_requests()[0])
    with PeakMemory() as batch:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=512, min_new_tokens=512, do_sample=True,
                       temperature=0.6, top_k=0)
    after_batch = used_gib() - start
    hf_minivllm.restore(model)
    gc.collect()
    resident = LLM(model, max_model_len=4096)
    resident_idle = used_gib() - start
    resident.close()
    results["memory"] = {
        "weights_gib": weights, "after_accelerate_gib": after_accelerate, "w2_peak_gib": w2.peak - start,
        "after_w2_gib": after_w2, "w1_batch_peak_gib": batch.peak - start, "after_w1_batch_gib": after_batch,
        "resident_llm_idle_gib": resident_idle, "device_gib": torch.cuda.mem_get_info()[1] / GIB,
    }
    del model, resident
    gc.collect()
    torch.cuda.empty_cache()


def two_models_and_training(results: dict) -> None:
    gc.collect()
    torch.cuda.empty_cache()
    start = used_gib()
    models = [hf_minivllm.accelerate(random_model("0.6b", seed=seed), max_model_len=4096) for seed in (0, 1)]
    prompts, _ = w1_requests()
    ids, mask = padded(prompts)
    calls = []
    for index, model in enumerate(models + models):
        with PeakMemory() as peak:
            begin = now()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=256, min_new_tokens=256,
                                 do_sample=True, temperature=0.6, top_k=0)
            seconds = now() - begin
        calls.append({"model": index % 2, "tok_s": (out.shape[1] - ids.shape[1]) * len(prompts) / seconds,
                      "peak_gib": peak.peak - start, "after_gib": used_gib() - start})
    trained = models[0]
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-5)
    trained.train()
    batch = torch.randint(0, 10000, (8, 1024), device="cuda")
    with PeakMemory() as peak:
        begin = now()
        trained(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step_seconds = now() - begin
    trained.eval()
    out = trained.generate(input_ids=ids[:8], attention_mask=mask[:8], max_new_tokens=16, do_sample=False)
    results["two_models_and_training"] = {
        "calls": calls, "training_step_peak_gib": peak.peak - start, "training_step_seconds": step_seconds,
        "generate_after_training_tokens": int(out.shape[1] - ids.shape[1]),
        "stats": [hf_minivllm.stats(model) for model in models],
    }
    for model in models:
        hf_minivllm.restore(model)
    del models, trained, optimizer
    gc.collect()
    torch.cuda.empty_cache()


def short_calls(results: dict, calls: int = 200, profile: bool = False) -> None:
    model = random_model("0.6b")
    hf_minivllm.accelerate(model, max_model_len=4096)
    runner = state_of(model).llm.engine.runner
    prompt = w2_prompt()
    w2 = dict(max_new_tokens=256, min_new_tokens=256, do_sample=False)
    model.generate(prompt, **w2)
    begin = now()
    model.generate(prompt, **w2)
    w2_ms = (now() - begin) * 1000 / 256
    growths, graphs = [], runner.graphs
    storage = getattr(runner, "storage", None)  # absent before the on-demand KV cache (baseline runs)
    if storage is not None:
        grow = storage.grow
        storage.grow = lambda *args: growths.append(args) or grow(*args)
    short = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 10000, (1, 128), generator=generator).cuda() for _ in range(calls)]
    model.generate(prompts[0], **short)
    begin = now()
    for p in prompts:
        model.generate(p, **short)
    seconds = now() - begin
    if profile:
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        for p in prompts[:50]:
            model.generate(p, **short)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(45)
        print(text.getvalue(), flush=True)
    results["short_calls"] = {
        "calls": calls, "ms_per_token": seconds * 1000 / (calls * 32), "ms_per_call": seconds * 1000 / calls,
        "w2_ms_per_token": w2_ms, "kv_growths": len(growths), "graphs_recaptured": runner.graphs is not graphs,
        "rebuilds": hf_minivllm.stats(model).get("rebuilds"),
    }
    del model
    gc.collect()
    torch.cuda.empty_cache()


class _CountingStreamer:
    def __init__(self):
        self.tokens = -1  # the prompt's put is not a token

    def put(self, value):
        self.tokens += 1

    def end(self):
        pass


class _StopWhen:
    """HF stopping criterion: every row stops once ``event`` is set (ends the HF peer's time window)."""

    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def w7_threads(results: dict, threads: int = 64, hf_window_s: float = 30.0) -> None:
    from transformers import StoppingCriteriaList

    prompts, params = w1_requests()
    model = random_model("0.6b")
    oracle = copy.deepcopy(model)
    hf_minivllm.accelerate(model, max_model_len=4096)
    llm = state_of(model).llm

    def settings(index):
        n = params[index].max_tokens
        return dict(max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=0.6, top_k=0)

    def worker(thread):
        tokens = 0
        for index in range(thread, len(prompts), threads):
            out = model.generate(torch.tensor([prompts[index]], device="cuda"), **settings(index))
            tokens += out.shape[1] - len(prompts[index])
        return tokens

    model.generate(torch.tensor([prompts[0]], device="cuda"), max_new_tokens=8)  # warm-up
    begin = now()
    with ThreadPoolExecutor(threads) as pool:
        tokens = sum(pool.map(worker, range(threads)))
    threaded = now() - begin
    begin = now()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    batch_seconds = now() - begin
    batch_tokens = sum(len(o["token_ids"]) for o in outputs)

    stop = threading.Event()
    streamers = [_CountingStreamer() for _ in range(threads)]

    def hf_worker(thread):
        for index in range(thread, len(prompts), threads):
            if stop.is_set():
                return
            oracle.generate(torch.tensor([prompts[index]], device="cuda"), streamer=streamers[thread],
                            stopping_criteria=StoppingCriteriaList([_StopWhen(stop)]), **settings(index))

    pool = ThreadPoolExecutor(threads)
    begin = now()
    futures = [pool.submit(hf_worker, thread) for thread in range(threads)]
    time.sleep(hf_window_s)
    hf_tokens = sum(max(s.tokens, 0) for s in streamers)
    hf_seconds = time.perf_counter() - begin
    stop.set()
    for future in futures:
        future.result()
    pool.shutdown()
    stats_after_threads = hf_minivllm.stats(model)

    def llm_worker(thread):
        return sum(len(llm.generate([prompts[i]], params[i], use_tqdm=False)[0]["token_ids"])
                   for i in range(thread, len(prompts), threads))

    begin = now()
    with ThreadPoolExecutor(threads) as pool:
        llm_thread_tokens = sum(pool.map(llm_worker, range(threads)))
    llm_threaded = now() - begin
    results["W7_threads"] = {
        "threads": threads, "requests": len(prompts), "tokens": tokens, "seconds": threaded,
        "tok_s": tokens / threaded, "llm_batch_tok_s": batch_tokens / batch_seconds,
        "llm_generate_threads_tok_s": llm_thread_tokens / llm_threaded, "stats_after_threads": stats_after_threads,
        "ratio_to_llm_batch": (tokens / threaded) / (batch_tokens / batch_seconds),
        "hf_threads_window_s": hf_seconds, "hf_threads_tokens": hf_tokens, "hf_threads_tok_s": hf_tokens / hf_seconds,
        "stats": hf_minivllm.stats(model),
    }
    del model, oracle, llm
    gc.collect()
    torch.cuda.empty_cache()


def figures(results: dict) -> list:
    """The figures with a peer in the same run: W7's threads against one LLM.generate batch and against HF in the
    same threads; the short calls' ms/token against W2; memory after start-up against the resident engine."""
    from results import Figure

    out = []
    w7 = results.get("W7_threads")
    if w7:
        workload = f"W7 ({w7['threads']} threads, {w7['requests']} W1 requests, batch 1 each)"
        out.append(Figure(workload, "output throughput", "tok/s", w7["tok_s"], "accelerate(model).generate in threads",
                          peer="HF generate in the same threads", peer_value=w7["hf_threads_tok_s"]))
        out.append(Figure(workload, "output throughput against one batch", "tok/s", w7["tok_s"],
                          "accelerate(model).generate in threads", peer="LLM.generate, one batch",
                          peer_value=w7["llm_batch_tok_s"]))
    calls = results.get("short_calls")
    if calls:
        out.append(Figure(f"{calls['calls']} short calls (0.6b, 32 tokens each)", "latency", "ms/token",
                          calls["ms_per_token"], "accelerate(model).generate", higher_is_better=False,
                          peer="the same engine on W2", peer_value=calls["w2_ms_per_token"]))
    memory = results.get("memory")
    if memory:
        out.append(Figure("GPU memory after start-up (0.6b)", "memory held beyond the weights", "GiB",
                          memory["after_accelerate_gib"] - memory["weights_gib"], "accelerate(model)",
                          higher_is_better=False, peer="LLM(model), resident KV cache",
                          peer_value=memory["resident_llm_idle_gib"] - memory["weights_gib"]))
    return out


SECTIONS = {"memory": memory, "two_models": two_models_and_training, "short_calls": short_calls,
            "w7": w7_threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", default=list(SECTIONS), help=" ".join(SECTIONS))
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", action="store_true", help="cProfile 50 of the short calls (host time by function)")
    args = parser.parse_args()
    results: dict = {"device": torch.cuda.get_device_name()}
    for name in args.only:
        begin = time.perf_counter()
        try:
            SECTIONS[name](results, **({"profile": True} if args.profile and name == "short_calls" else {}))
        except Exception as error:  # noqa: BLE001 - report and go on with the other sections
            import traceback

            traceback.print_exc()
            results[f"{name}_error"] = repr(error)
        print(f"[{name}: {time.perf_counter() - begin:.0f} s]", flush=True)
        print(json.dumps({k: v for k, v in results.items() if k != "device"}, indent=1, default=str), flush=True)
    from results import finish_run
    from workloads import commit

    finish_run(args.out, {**results, "commit": commit()}, figures(results), "real_programs")


if __name__ == "__main__":
    main()
