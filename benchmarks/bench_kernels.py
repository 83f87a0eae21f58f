"""Kernel benchmarks on one GPU: our Triton kernels vs flash-attn 4 (when it imports) and torch.

Shapes (DESIGN.md section 3): decode at batch 256, contexts uniform in 200..2000 (seed 0), 16 query / 8 KV heads,
head dim 128, bf16, block sizes 16 and 64, plus batch-1 decode at 4k and 16k; causal varlen prefill 16 x 1024;
RMSNorm (plain and fused with the residual add) and SiLU-and-mul against torch eager.

    python benchmarks/bench_kernels.py --out bench_kernels.json [--site-dir DIR ...] [--tune] [--splits] [--gemv]

``--site-dir`` adds a ``pip --target`` folder through ``site.addsitedir`` (flash-attn 4's CUTLASS DSL registers
itself through a .pth file that PYTHONPATH skips). ``--tune`` also sweeps the attention kernels' tile configs,
``--splits`` the decode split count at W1's mid-run batch sizes, ``--gemv`` times batch-1 projections;
``--gemv-only [--gemv-shapes 8b/2]`` only the projections (those of one model and TP size), with a sweep of tiles;
``--head-dims 96,128`` times only the attention rows at each head dim (padded tiles for one not a power of two);
``--sampling`` times the engine's sampler at 1, 32 and 256 rows of Qwen3's vocabulary: argmax, temperature only
(the one-pass kernel), HF-style top-k 20 with top-p 0.95 (also replayed from a CUDA graph: its GPU time), and
that path's one vocabulary-wide step alone (``torch.topk``).
Times are medians of ``triton.testing.do_bench`` over CUDA-graph replays, except the torch attention references
(plain calls: they sync with the host).
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import site
import sys
from dataclasses import replace
from typing import Callable

import torch
import triton

from hf_minivllm.kernels import activation, decode_attention, gemv, kv_cache, prefill_attention, rms_norm

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, DTYPE = 16, 8, 128, torch.bfloat16
FA4_DECODE_TBPS, FA4_PREFILL_TFLOPS = 2.8, 340.0  # DESIGN.md yardsticks, measured on the H100


def bench(fn: Callable[[], object], graph: bool = True, repeat: int = 1) -> float:
    """Median milliseconds of ``fn``; with ``graph``, of its CUDA-graph replay, as the engine runs decode steps,
    so that Python launch overhead does not hide GPU time at small sizes. ``repeat`` calls captured in one graph
    (the time divided by it) leave out the graph's own launch, which is most of a one-kernel graph's ~8 us."""
    if not graph:
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()  # compile / JIT outside the capture
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        for _ in range(repeat):
            fn()
    return triton.testing.do_bench(cuda_graph.replay, warmup=25, rep=200, return_mode="median") / repeat


def bench_fa4(fn: Callable[[], object]) -> float:
    """FA4 in a CUDA graph like ours, or plain calls where this FA4 build cannot be captured."""
    try:
        return bench(fn)
    except RuntimeError as error:
        print(f"flash-attn 4 not graph-capturable here, timing plain calls: {error}", file=sys.stderr)
        torch.cuda.synchronize()
        return bench(fn, graph=False)


def load_flash_attn4() -> Callable | None:
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except Exception as error:  # noqa: BLE001 - report why and carry on without it
        print(f"flash-attn 4 unavailable: {type(error).__name__}: {error}", file=sys.stderr)
        return None
    return flash_attn_varlen_func


def first(result: object) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


class PagedCache:
    """A bf16 KV cache holding the given contexts in shuffled pages, and each sequence's block table."""

    def __init__(self, context_lens: list[int], block_size: int, seed: int = 0, fp8: bool = False):
        generator = torch.Generator(device="cuda").manual_seed(seed)
        pages = [triton.cdiv(length, block_size) for length in context_lens]
        num_blocks = sum(pages)
        shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
        self.k_cache = torch.randn(shape, generator=generator, device="cuda", dtype=DTYPE)
        self.v_cache = torch.randn(shape, generator=generator, device="cuda", dtype=DTYPE)
        self.kv_scales = None
        if fp8:  # e4m3 with a scale each for keys and values, as the engine's FP8 cache stores them
            self.kv_scales = torch.tensor([0.01, 0.02], device="cuda")
            self.k_cache = kv_cache.quantize_fp8(self.k_cache, self.kv_scales[0])
            self.v_cache = kv_cache.quantize_fp8(self.v_cache, self.kv_scales[1])
        order = torch.randperm(num_blocks, generator=generator, device="cuda").to(torch.int32)
        self.block_tables = torch.zeros(len(context_lens), max(pages), dtype=torch.int32, device="cuda")
        start = 0
        for seq, count in enumerate(pages):
            self.block_tables[seq, :count] = order[start:start + count]
            start += count
        self.context_lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
        self.block_size = block_size


def decode_rows(name: str, context_lens: list[int], block_size: int, fa4: Callable | None,
                with_torch: bool, check: bool = True, num_splits: int | None = None, fp8: bool = False) -> list[dict]:
    cache = PagedCache(context_lens, block_size, fp8=fp8)
    q = torch.randn(len(context_lens), NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    scale = HEAD_DIM ** -0.5
    args = (q, cache.k_cache, cache.v_cache, cache.context_lens, cache.block_tables, scale)
    options = dict(kv_scales=cache.kv_scales)
    kv_bytes = sum(context_lens) * 2 * NUM_KV_HEADS * HEAD_DIM * cache.k_cache.element_size()
    row = {"kernel": name, "metric": "TB/s"}
    if check:
        reference = decode_attention.paged_decode_attention_torch(*args, **options).float()
        row["max_abs_error"] = (decode_attention.paged_decode_attention(*args, **options).float()
                                - reference).abs().max().item()
    row["ms"] = bench(lambda: decode_attention.paged_decode_attention(*args, num_splits=num_splits, **options))
    row["value"] = kv_bytes / row["ms"] / 1e9
    if fa4 is not None:
        def call_fa4() -> torch.Tensor:
            return first(fa4(q.unsqueeze(1), cache.k_cache, cache.v_cache, seqused_k=cache.context_lens,
                             page_table=cache.block_tables, softmax_scale=scale, causal=True))
        if check:
            row["fa4_max_abs_error"] = (call_fa4().squeeze(1).float() - reference).abs().max().item()
        row["fa4_ms"] = bench_fa4(call_fa4)
    if with_torch:
        row["torch_ms"] = bench(lambda: decode_attention.paged_decode_attention_torch(*args, **options), graph=False)
    row["yardstick"] = FA4_DECODE_TBPS
    return [row]


def prefill_rows(name: str, query_lens: list[int], block_size: int, fa4: Callable | None,
                 with_torch: bool, check: bool = True) -> list[dict]:
    cache = PagedCache(query_lens, block_size)
    q = torch.randn(sum(query_lens), NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    cu = torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32, device="cuda")
    scale = HEAD_DIM ** -0.5
    args = (q, cache.k_cache, cache.v_cache, cu, cu, max(query_lens), max(query_lens), cache.block_tables, scale)
    flops = 4 * sum(length * length / 2 for length in query_lens) * NUM_HEADS * HEAD_DIM
    row = {"kernel": name, "metric": "TFLOP/s"}
    if check:
        reference = prefill_attention.paged_prefill_attention_torch(*args).float()
        row["max_abs_error"] = (prefill_attention.paged_prefill_attention(*args).float() - reference).abs().max().item()
    row["ms"] = bench(lambda: prefill_attention.paged_prefill_attention(*args))
    row["value"] = flops / row["ms"] / 1e9
    if fa4 is not None:
        def call_fa4() -> torch.Tensor:
            return first(fa4(q, cache.k_cache, cache.v_cache, cu_seqlens_q=cu, max_seqlen_q=max(query_lens),
                             max_seqlen_k=max(query_lens), seqused_k=cache.context_lens,
                             page_table=cache.block_tables, softmax_scale=scale, causal=True))
        if check:
            row["fa4_max_abs_error"] = (call_fa4().float() - reference).abs().max().item()
        row["fa4_ms"] = bench_fa4(call_fa4)
    if with_torch:
        row["torch_ms"] = bench(lambda: prefill_attention.paged_prefill_attention_torch(*args), graph=False)
    row["yardstick"] = FA4_PREFILL_TFLOPS
    return [row]


def head_dim_rows(head_dims: list[int], decode_contexts: list[int], fa4: Callable | None,
                  with_torch: bool) -> list[dict]:
    """The attention rows at each head dim (the module's HEAD_DIM rebound for the call): a head dim that is not a
    power of two runs on the next power of two's tiles with masked lanes, so its time per byte shows the padding."""
    global HEAD_DIM
    rows, default = [], HEAD_DIM
    try:
        for head_dim in head_dims:
            HEAD_DIM = head_dim
            rows += decode_rows(f"hd{head_dim} decode b256 ctx200-2000 bs16", decode_contexts, 16, fa4, with_torch)
            rows += decode_rows(f"hd{head_dim} decode fp8 b256 ctx200-2000 bs16", decode_contexts, 16, None, False,
                                fp8=True)
            rows += decode_rows(f"hd{head_dim} decode b1 ctx4096 bs16", [4096], 16, fa4, with_torch)
            rows += prefill_rows(f"hd{head_dim} prefill 16x1024 causal bs16", [1024] * 16, 16, fa4, with_torch)
    finally:
        HEAD_DIM = default
    return rows


def elementwise_rows() -> list[dict]:
    rows = []
    for tokens, hidden in ((256, 1024), (4096, 1024), (256, 4096), (4096, 4096)):
        x, residual = (torch.randn(tokens, hidden, device="cuda", dtype=DTYPE) for _ in range(2))
        weight = torch.randn(hidden, device="cuda", dtype=DTYPE)
        io_bytes = x.numel() * DTYPE.itemsize
        for name, ours, eager, passes in (
            ("rms_norm", lambda: rms_norm.rms_norm(x, weight, 1e-6),
             lambda: rms_norm.rms_norm_torch(x, weight, 1e-6), 2),
            ("fused_add_rms_norm", lambda: rms_norm.fused_add_rms_norm(x, residual, weight, 1e-6),
             lambda: rms_norm.fused_add_rms_norm_torch(x, residual, weight, 1e-6), 4),
        ):
            ms = bench(ours)
            rows.append({"kernel": f"{name} {tokens}x{hidden}", "metric": "TB/s", "ms": ms,
                         "value": passes * io_bytes / ms / 1e9, "torch_ms": bench(eager)})
    for tokens, intermediate in ((256, 3072), (4096, 3072), (256, 12288), (4096, 12288)):
        gate_up = torch.randn(tokens, 2 * intermediate, device="cuda", dtype=DTYPE)
        ms = bench(lambda: activation.silu_and_mul(gate_up))
        rows.append({"kernel": f"silu_and_mul {tokens}x{intermediate}", "metric": "TB/s", "ms": ms,
                     "value": 1.5 * gate_up.numel() * DTYPE.itemsize / ms / 1e9,
                     "torch_ms": bench(lambda: activation.silu_and_mul_torch(gate_up))})
    return rows


def tune_rows(decode_contexts: list[int]) -> list[dict]:
    """Sweep tile configs (replacing the config table's entry) on the decode and prefill shapes."""
    rows = []
    original_decode, original_prefill = decode_attention._decode_config, prefill_attention._prefill_config
    try:
        for block_n, warps, stages in itertools.product((32, 64, 128), (4, 8), (2, 3, 4)):
            config = dict(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
            decode_attention._decode_config = lambda *_, config=config: dict(config)
            for block_size in (16, 64):
                for name, contexts in (("b256", decode_contexts), ("b1-16k", [16384])):
                    try:
                        row = decode_rows(f"tune decode {name} bs{block_size} {config}", contexts, block_size,
                                          None, False, check=False)[0]
                    except Exception as error:  # noqa: BLE001 - some configs do not fit
                        row = {"kernel": f"tune decode {name} bs{block_size} {config}", "error": str(error)[:200]}
                    rows.append(row)
        for block_m, block_n, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
            config = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
            prefill_attention._prefill_config = lambda *_, config=config: dict(config)
            try:
                row = prefill_rows(f"tune prefill {config}", [1024] * 16, 16, None, False, check=False)[0]
            except Exception as error:  # noqa: BLE001
                row = {"kernel": f"tune prefill {config}", "error": str(error)[:200]}
            rows.append(row)
    finally:
        decode_attention._decode_config, prefill_attention._prefill_config = original_decode, original_prefill
    return rows


def tune_fp8_rows(decode_contexts: list[int]) -> list[dict]:
    """Decode on an FP8 cache (W1's batch of 256, pages of 16): the bf16 cache's timing beside the FP8 cache's
    under each tile config. An FP8 tile carries half the bytes of a bf16 tile of the same tokens."""
    rows = decode_rows("tune-fp8 decode b256 bs16 bf16 cache (default config)", decode_contexts, 16, None, False)
    rows += decode_rows("tune-fp8 decode b256 bs16 FP8 cache (default config)", decode_contexts, 16, None, False,
                        fp8=True)
    original = decode_attention._decode_config
    try:
        # 1- and 2-warp programs keep a tile's softmax inside fewer warps (fewer cross-warp exchanges), and more
        # of them fit on an SM; the register cap trades spills for programs per SM.
        for block_n, warps, stages, max_registers in itertools.product((32, 64, 128), (1, 2, 4), (2, 3), (None, 160)):
            config = dict(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
            if max_registers is not None:
                config["maxnreg"] = max_registers
            decode_attention._decode_config = lambda *_, config=config: dict(config)
            name = f"tune-fp8 decode b256 bs16 {config}"
            try:
                rows += decode_rows(name, decode_contexts, 16, None, False, fp8=True)
            except Exception as error:  # noqa: BLE001 - some configs do not fit
                rows.append({"kernel": name, "error": str(error)[:200]})
            print(rows[-1], flush=True)  # a sweep cut short by a time limit still tells what it measured
    finally:
        decode_attention._decode_config = original
    return rows


def split_rows(rng: random.Random) -> list[dict]:
    """Decode at W1's mid-run batch sizes (contexts 200-2000): the static split heuristic against fixed splits."""
    rows = []
    for batch in (16, 32, 64, 128):
        contexts = [rng.randint(200, 2000) for _ in range(batch)]
        for num_splits in (None, 1, 2, 4, 8):
            label = "heuristic" if num_splits is None else str(num_splits)
            rows += decode_rows(f"decode b{batch} ctx200-2000 bs16 splits={label}", contexts, 16, None, False,
                                check=False, num_splits=num_splits)
    return rows


GEMV_SHAPES = {  # (out_features, in_features): 0.6B, and the 8B architecture whole (TP=1) and per rank at TP=2
    "0.6b qkv": (4096, 1024), "0.6b o": (1024, 2048), "0.6b gate_up": (6144, 1024), "0.6b down": (1024, 3072),
    "0.6b lm_head": (151936, 1024), "8b qkv": (6144, 4096), "8b o": (4096, 4096), "8b gate_up": (24576, 4096),
    "8b down": (4096, 12288), "8b/2 qkv": (3072, 4096), "8b/2 o": (4096, 2048), "8b/2 gate_up": (12288, 4096),
    "8b/2 down": (4096, 6144), "8b/2 lm_head": (75968, 4096),
}


GEMV_REPEAT = 20  # projections per timed graph: a decode step's graph holds hundreds back to back
GEMV_TUNED = ("0.6b o", "0.6b gate_up", "8b gate_up", "8b/2 qkv", "8b/2 down")


def _gemv_with_tiles(x: torch.Tensor, weight: torch.Tensor, tiles: tuple[int, int, int, int]) -> torch.Tensor:
    block_n, block_k, num_warps = tiles[1:]
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    gemv._gemv_kernel[(triton.cdiv(weight.shape[0], block_n),)](
        x, weight, weight, out, x.shape[0], weight.shape[0], x.shape[1], x.stride(0), weight.stride(0),
        out.stride(0), HAS_BIAS=False, BLOCK_M=tiles[0], BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps)
    return out


def gemv_rows(tune: bool, prefix: str | None = None) -> list[dict]:
    """Decode projections at 1-8 rows: cuBLAS (``F.linear``) against ``kernels/gemv.py`` (its own tiles, and with
    ``tune`` a sweep of tiles at 1 row), in TB/s of weights read. ``prefix``: only the shapes whose name starts with
    it, every one of them swept."""
    rows = []
    for name, (out_features, in_features) in GEMV_SHAPES.items():
        if prefix is not None and not name.startswith(prefix):
            continue
        weight = torch.randn(out_features, in_features, device="cuda", dtype=DTYPE)
        gigabytes = weight.numel() * weight.element_size() / 1e9
        for num_rows in (1, 2, 4, 8):
            x = torch.randn(num_rows, in_features, device="cuda", dtype=DTYPE)
            cublas_ms = bench(lambda: torch.nn.functional.linear(x, weight), repeat=GEMV_REPEAT)
            ours_ms = bench(lambda: gemv.gemv(x, weight), repeat=GEMV_REPEAT)
            rows.append({"kernel": f"gemv {name} {out_features}x{in_features} rows={num_rows}", "metric": "TB/s",
                         "ms": ours_ms, "value": gigabytes / ours_ms, "torch_ms": cublas_ms,
                         "tiles": gemv._tiles(num_rows, out_features, in_features)})
        if tune and (name in GEMV_TUNED or prefix is not None):
            x = torch.randn(1, in_features, device="cuda", dtype=DTYPE)
            for block_n, block_k, num_warps in itertools.product((1, 2, 4, 8), (256, 512, 1024), (2, 4)):
                tiles = (1, block_n, block_k, num_warps)
                ms = bench(lambda: _gemv_with_tiles(x, weight, tiles), repeat=GEMV_REPEAT)
                rows.append({"kernel": f"gemv tune {name} rows=1 n{block_n} k{block_k} w{num_warps}",
                             "metric": "TB/s", "ms": ms, "value": gigabytes / ms})
    return rows


def sampling_rows() -> list[dict]:
    """The engine's sampler (``layers.sampler.sample``) on bf16 logits of 151,936 columns, plain calls (it runs
    outside the decode graphs): greedy, temperature 0.6 alone, with Qwen3's top-k 20 and top-p 0.95, and with
    top-p 0.95 alone (the whole vocabulary's sort, a chunk of rows at a time)."""
    from hf_minivllm.layers.sampler import GREEDY, SamplingTensors, sample, tie_margin

    vocab, rows = 151936, []
    for batch in (1, 32, 256):
        logits = torch.randn(batch, vocab, device="cuda", dtype=DTYPE)
        temperatures = torch.full((batch,), 0.6, device="cuda")
        plain = SamplingTensors(temperatures=temperatures, top_ks=None, top_ps=None, min_ps=None, all_greedy=False,
                                any_greedy=False, use_top_k=False, use_top_p=False, use_min_p=False)
        hf_style = SamplingTensors(temperatures=temperatures, top_ks=torch.full((batch,), 20, device="cuda"),
                                   top_ps=torch.full((batch,), 0.95, device="cuda"), min_ps=None, all_greedy=False,
                                   any_greedy=False, use_top_k=True, use_top_p=True, use_min_p=False, max_top_k=20)
        top_p = replace(hf_style, top_ks=None, use_top_k=False, max_top_k=None)
        calls = [(name, lambda params=params: sample(logits, params))
                 for name, params in (("greedy", GREEDY), ("temperature", plain), ("top-k 20, top-p 0.95", hf_style),
                                      ("top-p 0.95, whole vocabulary", top_p))]
        # The top-k path's one vocabulary-wide step alone: the rest of it is small tensors, so what the path takes
        # beyond this is launches (host time).
        window = 20 + tie_margin(20)  # the candidates a top-k of 20 takes
        calls.append((f"torch.topk {window} alone", lambda: logits.topk(window, dim=-1)))
        for name, call in calls:
            ms = bench(call, graph=False)
            rows.append({"kernel": f"sampling {name} rows={batch}", "metric": "GB/s", "ms": ms,
                         "value": logits.numel() * logits.element_size() / ms / 1e6})
        try:  # the GPU's share of the top-k path: replays leave out the launches' host time
            ms = bench(calls[2][1], graph=True)
            rows.append({"kernel": f"sampling top-k 20, top-p 0.95 rows={batch} (CUDA graph)", "metric": "GB/s",
                         "ms": ms, "value": logits.numel() * logits.element_size() / ms / 1e6})
        except Exception as error:  # noqa: BLE001 - a capture that fails says so in the table
            rows.append({"kernel": f"sampling top-k 20, top-p 0.95 rows={batch} (CUDA graph)", "error": str(error)[:200]})
    rows += whole_vocabulary_chunk_rows(vocab)
    return rows


def whole_vocabulary_chunk_rows(vocab: int) -> list[dict]:
    """Top-p 0.95 over the whole vocabulary at 256 rows, with the sampler's chunk of rows (``CHUNK_ELEMENTS``) at
    2^23 to 2^25 logits, and at 2^27 (one chunk)."""
    from hf_minivllm.layers import sampler

    if not hasattr(sampler, "CHUNK_ELEMENTS"):
        return []  # a sampler from before the chunks (c9cf02d), timed for comparison
    batch, rows, default = 256, [], sampler.CHUNK_ELEMENTS
    logits = torch.randn(batch, vocab, device="cuda", dtype=DTYPE)
    params = sampler.SamplingTensors(
        temperatures=torch.full((batch,), 0.6, device="cuda"), top_ks=None,
        top_ps=torch.full((batch,), 0.95, device="cuda"), min_ps=None, all_greedy=False, any_greedy=False,
        use_top_k=False, use_top_p=True, use_min_p=False)
    try:
        for exponent in (23, 24, 25, 27):
            sampler.CHUNK_ELEMENTS = 1 << exponent
            ms = bench(lambda: sampler.sample(logits, params), graph=False)
            rows.append({"kernel": f"sampling top-p 0.95, whole vocabulary rows={batch} chunk=2^{exponent}",
                         "metric": "GB/s", "ms": ms, "value": logits.numel() * logits.element_size() / ms / 1e6})
    finally:
        sampler.CHUNK_ELEMENTS = default
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'kernel':<58} {'ms':>9} {'value':>9} {'metric':<8} {'vs yardstick':>12} {'FA4 ms':>9} {'ours/FA4':>8} {'torch ms':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        if "error" in row:
            print(f"{row['kernel']:<58} error: {row['error']}")
            continue
        yardstick = f"{row['value'] / row['yardstick']:.0%}" if "yardstick" in row else ""
        fa4_ms = f"{row['fa4_ms']:.4f}" if "fa4_ms" in row else ""
        ratio = f"{row['fa4_ms'] / row['ms']:.2f}" if "fa4_ms" in row else ""
        torch_ms = f"{row['torch_ms']:.4f}" if "torch_ms" in row else ""
        print(f"{row['kernel']:<58} {row['ms']:>9.4f} {row['value']:>9.2f} {row['metric']:<8} {yardstick:>12} "
              f"{fa4_ms:>9} {ratio:>8} {torch_ms:>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_kernels.json", help="where to write the JSON results")
    only = parser.add_mutually_exclusive_group()  # each of these runs alone
    parser.add_argument("--site-dir", action="append", default=[], help="a pip --target folder to add (repeatable)")
    parser.add_argument("--tune", action="store_true", help="also sweep the attention kernels' tile configs")
    parser.add_argument("--no-torch", action="store_true", help="skip the (slow) torch reference timings")
    only.add_argument("--tune-fp8", action="store_true", help="only sweep the decode tile configs on an FP8 cache")
    parser.add_argument("--splits", action="store_true", help="also sweep decode split counts at W1's batch sizes")
    parser.add_argument("--gemv", action="store_true", help="also time decode projections (cuBLAS against ours)")
    only.add_argument("--gemv-only", action="store_true", help="only the projections, with a sweep of our tiles")
    only.add_argument("--sampling", action="store_true", help="only the sampler: greedy, temperature, top-k/top-p")
    only.add_argument("--head-dims", help="only the attention rows (decode bf16 and FP8, prefill) at each of these "
                      "comma-separated head dims, e.g. 96,128: what a padded head tile costs")
    parser.add_argument("--gemv-shapes", help="with --gemv-only: only the shapes whose name starts with this, all "
                        "swept (e.g. 8b/2, the 8B architecture's per-rank shapes at TP=2)")
    args = parser.parse_args()
    if (args.tune_fp8 or args.gemv_only or args.sampling or args.head_dims) and (args.tune or args.splits or args.gemv):
        parser.error("--tune, --splits and --gemv add to the default rows; --tune-fp8, --gemv-only and --sampling "
                     "run alone")
    for directory in args.site_dir:
        site.addsitedir(directory)
    fa4 = load_flash_attn4()
    with_torch = not args.no_torch

    rng = random.Random(0)
    decode_contexts = [rng.randint(200, 2000) for _ in range(256)]
    rows = []
    if args.head_dims:
        rows += head_dim_rows([int(dim) for dim in args.head_dims.split(",")], decode_contexts, fa4, with_torch)
        write(rows, fa4, args.out)
        return
    if args.gemv_only or args.sampling or args.tune_fp8:
        if args.gemv_only:
            rows += gemv_rows(tune=True, prefix=args.gemv_shapes)
        else:
            rows += sampling_rows() if args.sampling else tune_fp8_rows(decode_contexts)
        write(rows, fa4, args.out)
        return
    for block_size in (16, 64):
        rows += decode_rows(f"decode b256 ctx200-2000 bs{block_size}", decode_contexts, block_size, fa4, with_torch)
    for context in (4096, 16384):
        rows += decode_rows(f"decode b1 ctx{context} bs16", [context], 16, fa4, with_torch)
    for block_size in (16, 64):
        rows += prefill_rows(f"prefill 16x1024 causal bs{block_size}", [1024] * 16, block_size, fa4, with_torch)
    rows += elementwise_rows()
    if args.tune:
        rows += tune_rows(decode_contexts)
    if args.splits:
        rows += split_rows(rng)
    if args.gemv:
        rows += gemv_rows(tune=False)
    write(rows, fa4, args.out)


def write(rows: list[dict], fa4: Callable | None, out: str) -> None:
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"flash-attn 4: {'yes' if fa4 else 'no'}")
    print_table(rows)
    with open(out, "w") as file:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "flash_attn4": fa4 is not None, "rows": rows}, file, indent=1)


if __name__ == "__main__":
    main()
