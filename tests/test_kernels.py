"""Each Triton kernel against its torch reference, and the references against naive float64 attention.

Without a GPU the kernels run under Triton's interpreter (tiny shapes, fp32/fp16: bf16 is unreliable there).
``triton.jit`` and triton's own library functions pick interpreter or compiler when they are imported, so
``TRITON_INTERPRET=1`` must be set before triton's first import; conftest sets it when there is no GPU;
when something else imported triton earlier in the same pytest process (transformers' model modules do), the
interpreter tests skip here and ``test_interpreter_tests_in_a_fresh_process`` reruns them in a subprocess.
GPU-marked tests sweep realistic shapes in bf16/fp16.
"""
from __future__ import annotations

import importlib
import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Callable
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from conftest import KERNELS_RUN_HERE, run_under_interpreter
from kernel_variants import compile_for_hopper

# Each test records the kernel variants it launches under the interpreter; the last compiles them for a GPU.
pytestmark = pytest.mark.usefixtures("launched_kernel_variants")

CUDA = torch.cuda.is_available()

DEVICE = "cuda" if CUDA else "cpu"
KERNEL_MODULES = ("kv_cache", "prefill_attention", "decode_attention", "rms_norm", "activation", "all_reduce",
                  "fused_moe")
# Out-of-range page ids in the unused tail of every block table: a kernel that reads them fails or goes wrong.
PADDING_PAGE = 1 << 30


@pytest.fixture(scope="module")
def kernels():
    """The kernel modules, compiled on a GPU or interpreted on CPU."""
    if not KERNELS_RUN_HERE:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set: "
                    "test_interpreter_tests_in_a_fresh_process runs these")
    return SimpleNamespace(**{name: importlib.import_module(f"hf_minivllm.kernels.{name}") for name in KERNEL_MODULES})


def test_interpreter_tests_in_a_fresh_process():
    """Runs this file and the layer tests under the interpreter when this process cannot (see the module doc)."""
    tests = Path(__file__).parent
    run_under_interpreter(tests / "test_kernels.py", tests / "test_attention_layer.py")


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3),
            torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}[dtype]


class PagedContexts:
    """Random per-sequence K/V scattered into shuffled pages of a cache, with the dense copies kept for checks."""

    def __init__(self, context_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str = DEVICE, seed: int = 0, spare_blocks: int = 3):
        generator = torch.Generator().manual_seed(seed)
        pages_per_seq = [math.ceil(length / block_size) for length in context_lens]
        num_blocks = sum(pages_per_seq) + spare_blocks
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_cache = torch.randn(shape, generator=generator).to(dtype).to(device)
        self.v_cache = torch.randn(shape, generator=generator).to(dtype).to(device)
        order = torch.randperm(num_blocks, generator=generator).tolist()
        width = max(pages_per_seq, default=0) + 1
        self.block_tables = torch.full((len(context_lens), width), PADDING_PAGE, dtype=torch.int32)
        self.keys, self.values = [], []
        for seq, (length, pages) in enumerate(zip(context_lens, pages_per_seq)):
            self.block_tables[seq, :pages] = torch.tensor(order[:pages], dtype=torch.int32)
            order = order[pages:]
            positions = torch.arange(length)
            slots = self.block_tables[seq, positions // block_size].to(torch.int64) * block_size + positions % block_size
            slots = slots.to(device)
            flat_k = self.k_cache.view(-1, num_kv_heads, head_dim)
            flat_v = self.v_cache.view(-1, num_kv_heads, head_dim)
            self.keys.append(flat_k[slots].double().cpu())
            self.values.append(flat_v[slots].double().cpu())
        self.block_tables = self.block_tables.to(device)
        self.context_lens = torch.tensor(context_lens, dtype=torch.int32, device=device)


def naive_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                    scale: float, sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Dense float64 attention of ``q [L, heads, d]`` at ``positions`` over ``keys [C, kv_heads, d]``; a sliding
    window keeps keys ``k > q - window`` (HF's overlay), a soft-cap maps scores to ``cap * tanh(s / cap)``."""
    group = q.shape[1] // keys.shape[1]
    keys = keys.double().repeat_interleave(group, dim=1)
    values = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), keys) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    key_positions = torch.arange(keys.shape[0])[None, :]
    visible = key_positions <= positions[:, None]
    if sliding_window is not None:
        visible &= key_positions > positions[:, None] - sliding_window
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)


def _prefill_case(query_lens: list[int], prefix_lens: list[int], block_size: int, num_heads: int, num_kv_heads: int,
                  head_dim: int, dtype: torch.dtype, seed: int = 0, device: str = DEVICE):
    context_lens = [q + p for q, p in zip(query_lens, prefix_lens)]
    paged = PagedContexts(context_lens, block_size, num_kv_heads, head_dim, dtype, device=device, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=generator).to(dtype).to(device)
    cu_q = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(context_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    args = (q, paged.k_cache, paged.v_cache, cu_q, cu_k, max(query_lens), max(context_lens), paged.block_tables,
            head_dim ** -0.5)
    return paged, args


def _decode_case(context_lens: list[int], block_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, seed: int = 0, device: str = DEVICE):
    paged = PagedContexts(context_lens, block_size, num_kv_heads, head_dim, dtype, device=device, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=generator).to(dtype).to(device)
    return paged, (q, paged.k_cache, paged.v_cache, paged.context_lens, paged.block_tables, head_dim ** -0.5)


def _upcast(args: tuple) -> tuple:
    """The same inputs in fp32, so a reference computed from them isolates the kernel's own rounding."""
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float8_e4m3fn
                 else a for a in args)


# ---------------------------------------------------------------- KV cache store


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size,head_dim", [(4, 16), (16, 16), (4, 24), (16, 96)])
def test_store_kvcache_matches_torch(kernels, dtype, block_size, head_dim):
    """Heads of 24 and 96 (not powers of two) too: the kernel's rows span the next power of two, masked."""
    num_kv_heads, tokens = 2, 9
    fused = torch.randn(tokens, (4 + 2 * num_kv_heads) * head_dim).to(dtype).to(DEVICE)
    # Strided views, as the model slices them out of a fused qkv projection.
    key = fused[:, 4 * head_dim:(4 + num_kv_heads) * head_dim].view(tokens, num_kv_heads, head_dim)
    value = fused[:, (4 + num_kv_heads) * head_dim:].view(tokens, num_kv_heads, head_dim)
    slots = torch.tensor([5, -1, 0, 17, 3, -1, 22, 8, 31], dtype=torch.int64, device=DEVICE)
    caches = [torch.randn(8, block_size, num_kv_heads, head_dim).to(dtype).to(DEVICE) for _ in range(2)]
    expected = [c.clone() for c in caches]
    kernels.kv_cache.store_kvcache(key, value, *caches, slots)
    kernels.kv_cache.store_kvcache_torch(key, value, *expected, slots)
    torch.testing.assert_close(caches[0], expected[0], atol=0, rtol=0)
    torch.testing.assert_close(caches[1], expected[1], atol=0, rtol=0)
    flat = expected[0].view(-1, num_kv_heads, head_dim)
    torch.testing.assert_close(flat[slots[slots >= 0]], key[slots >= 0])


# ---------------------------------------------------------------- decode attention


# Page sizes and head groups crossed, the dtype alternating over them rather than crossed with them: the paging and
# grouping do not depend on the dtype, and each page size and each group still meets both dtypes (the interpreter
# takes about a second a case).
PAGES_GROUPS_DTYPES = [(block_size, group, (torch.float32, torch.float16)[(i + j) % 2])
                       for i, block_size in enumerate([4, 8, 16]) for j, group in enumerate([1, 2, 4])]


@pytest.mark.parametrize("block_size,group,dtype", PAGES_GROUPS_DTYPES)
def test_decode_matches_torch(kernels, block_size, group, dtype):
    num_kv_heads = 2
    paged, args = _decode_case([1, 9, 37, 70], block_size, num_kv_heads * group, num_kv_heads, 16, dtype,
                               seed=block_size + group)
    expected = kernels.decode_attention.paged_decode_attention_torch(*_upcast(args))
    for num_splits in (1, 3):
        out = kernels.decode_attention.paged_decode_attention(*args, num_splits=num_splits)
        torch.testing.assert_close(out.float(), expected, **_tolerance(dtype))


def test_decode_head_dim_32_default_splits_and_empty_row(kernels):
    """The static split heuristic path, and a padding row (context 0) that must come out finite."""
    paged, args = _decode_case([0, 5, 64, 130], 8, 8, 2, 32, torch.float32, seed=7)
    out = kernels.decode_attention.paged_decode_attention(*args)
    expected = kernels.decode_attention.paged_decode_attention_torch(*args)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1:], expected[1:], **_tolerance(torch.float32))


def test_decode_agrees_across_split_counts_on_both_merge_widths(kernels):
    """The split count comes from the grid (one compiled kernel for all); counts past 8 take the wide merge tile,
    and splits left empty by a short context merge to nothing."""
    paged, args = _decode_case([1, 40, 150, 330], 16, 4, 2, 32, torch.float32, seed=21)
    expected = kernels.decode_attention.paged_decode_attention_torch(*args)
    for num_splits in (1, 2, 9, 40):
        out = kernels.decode_attention.paged_decode_attention(*args, num_splits=num_splits)
        torch.testing.assert_close(out, expected, **_tolerance(torch.float32))


def _shared_prefix_case(context_lens: list[int], shared_pages: int, block_size: int, num_heads: int,
                        num_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int) -> tuple:
    """Decode inputs whose sequences share their first ``shared_pages`` pages (as prefix caching leaves them), the
    rest of each table shuffled private pages, padding past each row's pages."""
    generator = torch.Generator().manual_seed(seed)
    own = [math.ceil(length / block_size) - shared_pages for length in context_lens]
    num_blocks = shared_pages + sum(own) + 2
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=generator).to(dtype).to(DEVICE) for _ in range(2))
    order = torch.randperm(num_blocks, generator=generator).tolist()
    shared, order = order[:shared_pages], order[shared_pages:]
    width = max(own) + shared_pages + 1
    tables = torch.full((len(context_lens), width), PADDING_PAGE, dtype=torch.int32)
    for row, pages in enumerate(own):
        tables[row, : shared_pages + pages] = torch.tensor(shared + order[:pages], dtype=torch.int32)
        order = order[pages:]
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=generator).to(dtype).to(DEVICE)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, lens, tables.to(DEVICE)


@pytest.mark.parametrize("group,dtype", [(1, torch.float32), (2, torch.float16), (4, torch.float32)])
def test_cascade_decode_matches_torch(kernels, dtype, group):
    """A shared prefix of 5 pages over 17 sequences (two tiles of queries, the second nearly empty), each with its
    own tokens after it (from one to several pages); with and without a soft-cap (grouped heads), and with a
    prefix shorter than the shared pages or none (one head per KV head). Each call is seconds under the
    interpreter: the cases are spread over the parameters."""
    block_size, num_kv_heads, head_dim = 8, 2, 16
    lens = [41 + 4 * index for index in range(17)]
    args = _shared_prefix_case(lens, 5, block_size, num_kv_heads * group, num_kv_heads, head_dim, dtype,
                               seed=group)
    module = kernels.decode_attention
    for softcap in (None,) if group == 1 else (None, 30.0):
        expected = module.paged_decode_attention_torch(*_upcast(args), 0.25, softcap=softcap)
        out = module.cascade_decode_attention(*args, 0.25, _prefix_len(5 * block_size), softcap=softcap)
        torch.testing.assert_close(out.float(), expected, **_tolerance(dtype))
    if group == 1:  # a prefix shorter than what the rows share is as right (the rest counts as each row's own)
        expected = module.paged_decode_attention_torch(*_upcast(args), 0.25)
        for prefix_len in (2 * block_size, 0):
            out = module.cascade_decode_attention(*args, 0.25, _prefix_len(prefix_len))
            torch.testing.assert_close(out.float(), expected, **_tolerance(dtype))


def test_cascade_decode_keeps_every_split_when_its_own_tokens_take_the_most(kernels, monkeypatch):
    """One sequence, one KV head, a long context on a GPU of many SMs: its own tokens would take all 64 splits, and
    with the prefix's one the merge's 64-wide tile would leave a range out; they take 63. Its 2,040 own tokens fill
    the 64th split of 32-key tiles (fp32), so a dropped split loses keys. A group of 3 heads (not a power of two)
    rides along."""
    module = kernels.decode_attention
    monkeypatch.setattr(module, "_sm_count", lambda device: 200)
    args = _shared_prefix_case([32 + 2040], 2, 16, 3, 1, 16, torch.float32, seed=11)
    expected = module.paged_decode_attention_torch(*args, 0.25)
    torch.testing.assert_close(module.cascade_decode_attention(*args, 0.25, _prefix_len(32)), expected,
                               **_tolerance(torch.float32))


def test_cascade_tiles_shrink_for_large_head_groups(kernels):
    tile = kernels.decode_attention.cascade_sequences_per_tile
    assert [tile(group, 128) for group in (1, 2, 3, 4, 8, 16, 64)] == [16, 16, 16, 16, 8, 4, 1]
    assert [tile(group, 256) for group in (1, 2, 4)] == [16, 16, 8]
    # A padded head's tile is sized for its padded width, so that its rows stay a power of two (Triton's ranges).
    assert [tile(group, 96) for group in (1, 4, 8, 16)] == [16, 16, 8, 4]
    assert [tile(group, 160) for group in (1, 2, 4)] == [16, 16, 8]


def _prefix_len(tokens: int) -> torch.Tensor:
    return torch.tensor([tokens], dtype=torch.int32, device=DEVICE)


def test_cascade_decode_rejects_a_prefix_length_that_is_not_a_device_int32(kernels):
    args = _shared_prefix_case([20, 30], 2, 8, 4, 2, 16, torch.float32, seed=3)
    cascade = kernels.decode_attention.cascade_decode_attention
    for bad in (torch.tensor([16]), torch.tensor([[16]], dtype=torch.int32)):
        with pytest.raises(ValueError, match=r"shared_prefix_len must be a \[1\] int32 tensor"):
            cascade(*args, 0.25, bad.to(DEVICE))


def test_choose_num_splits_depends_on_static_shapes_only(kernels):
    choose = kernels.decode_attention.choose_num_splits
    assert choose(batch=256, num_kv_heads=8, max_context=4096, block_n=64, num_sms=132) == 1
    assert choose(batch=1, num_kv_heads=8, max_context=16384, block_n=64, num_sms=132) == 33
    assert choose(batch=1, num_kv_heads=8, max_context=64, block_n=64, num_sms=132) == 1
    assert choose(batch=1, num_kv_heads=1, max_context=1 << 20, block_n=64, num_sms=132) == 64


def test_decode_pipeline_stages_fit_the_gpus_shared_memory(kernels, monkeypatch):
    """An FP8 cache's stages of 128-token tiles (one tile each as Triton 3.6 compiles them: 2 at head_dim 128 with
    the register cap, 5 of 141 KiB in all at 256) fit a Hopper's shared memory; an Ada's 99 KB gets fewer at
    head_dim 256, never a compile that runs out of resources. The register cap applies to head_dim 128 on CUDA
    only. The bf16 cache's tiles keep their measured config everywhere."""
    module = kernels.decode_attention
    gpu = torch.device("cuda", 0)
    fp8 = torch.float8_e4m3fn
    for shared, head_dim, cache_dtype, stages in ((227 * 1024, 128, fp8, 2), (99 * 1024, 128, fp8, 2),
                                                  (227 * 1024, 256, fp8, 5), (99 * 1024, 256, fp8, 2),
                                                  (48 * 1024, 256, fp8, 1), (99 * 1024, 256, torch.bfloat16, 3)):
        monkeypatch.setattr(module, "_shared_memory_bytes", lambda index, shared=shared: shared)
        config = module._decode_config(torch.bfloat16, cache_dtype, head_dim, gpu)
        assert config["num_stages"] == stages
        capped = cache_dtype == fp8 and head_dim == 128 and torch.version.hip is None
        assert config.get("maxnreg") == (module._FP8_MAX_REGISTERS if capped else None)
    assert module._decode_config(torch.bfloat16, fp8, 128, torch.device("cpu")) == dict(BLOCK_N=128, num_warps=4,
                                                                                      num_stages=2)


# ---------------------------------------------------------------- prefill attention


@pytest.mark.parametrize("with_prefix", [False, True])
@pytest.mark.parametrize("block_size,group,dtype", PAGES_GROUPS_DTYPES)
def test_prefill_matches_torch(kernels, block_size, group, dtype, with_prefix):
    num_kv_heads = 2
    prefix_lens = [0, 8, 13] if with_prefix else [0, 0, 0]
    paged, args = _prefill_case([5, 1, 40], prefix_lens, block_size, num_kv_heads * group, num_kv_heads, 16, dtype,
                                seed=block_size * group)
    out = kernels.prefill_attention.paged_prefill_attention(*args)
    expected = kernels.prefill_attention.paged_prefill_attention_torch(*_upcast(args))
    torch.testing.assert_close(out.float(), expected, **_tolerance(dtype))


def _padded_as_a_prefill_graph_runs_it(args: tuple, num_padding_tokens: int, num_padding_seqs: int,
                                        grid_tokens: int) -> tuple:
    """The same prefill packed as a captured prefill graph pads it: extra query rows past the last sequence, empty
    sequences after it (their bounds repeat the last), and a grid sized for ``grid_tokens`` per sequence."""
    q, k_cache, v_cache, cu_q, cu_k, _, max_k, block_tables, scale = args
    # Padding rows hold whatever the graph's memory held (NaN here); padding sequences' table rows are never read.
    q = torch.cat([q, torch.full((num_padding_tokens, *q.shape[1:]), float("nan"), dtype=q.dtype, device=q.device)])
    cu_q = torch.cat([cu_q, cu_q[-1:].repeat(num_padding_seqs)])
    cu_k = torch.cat([cu_k, cu_k[-1:].repeat(num_padding_seqs)])
    block_tables = torch.cat([block_tables, torch.full((num_padding_seqs, block_tables.shape[1]), PADDING_PAGE,
                                                       dtype=block_tables.dtype, device=block_tables.device)])
    return q, k_cache, v_cache, cu_q, cu_k, grid_tokens, max_k, block_tables, scale


@pytest.mark.parametrize("sliding_window", [None, 6])
def test_prefill_padded_as_in_a_prefill_graph_matches_torch_on_real_rows(kernels, sliding_window):
    paged, args = _prefill_case([5, 1, 23], [0, 8, 13], 4, 4, 2, 16, torch.float32, seed=5)
    padded = _padded_as_a_prefill_graph_runs_it(args, num_padding_tokens=35, num_padding_seqs=3, grid_tokens=64)
    out = kernels.prefill_attention.paged_prefill_attention(*padded, sliding_window=sliding_window)
    expected = kernels.prefill_attention.paged_prefill_attention_torch(*args, sliding_window=sliding_window)
    torch.testing.assert_close(out[: args[0].shape[0]], expected, **_tolerance(torch.float32))
    reference = kernels.prefill_attention.paged_prefill_attention_torch(*padded, sliding_window=sliding_window)
    torch.testing.assert_close(reference[: args[0].shape[0]], expected, atol=0, rtol=0)


def test_prefill_head_dim_32_long_prefix(kernels):
    """Several unmasked tiles before the causal diagonal (prefix longer than a key tile)."""
    paged, args = _prefill_case([3, 20], [70, 45], 16, 4, 2, 32, torch.float32, seed=3)
    out = kernels.prefill_attention.paged_prefill_attention(*args)
    expected = kernels.prefill_attention.paged_prefill_attention_torch(*args)
    torch.testing.assert_close(out, expected, **_tolerance(torch.float32))


# ---------------------------------------------------------------- torch references vs naive float64 attention


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_torch_references_match_naive_attention(kernels, block_size, group):
    query_lens, prefix_lens = [4, 1, 23], [0, 6, 17]
    paged, args = _prefill_case(query_lens, prefix_lens, block_size, 2 * group, 2, 16, torch.float32, device="cpu")
    out = kernels.prefill_attention.paged_prefill_attention_torch(*args)
    q, scale, start = args[0], args[-1], 0
    for seq, (query_len, prefix_len) in enumerate(zip(query_lens, prefix_lens)):
        positions = torch.arange(prefix_len, prefix_len + query_len)
        expected = naive_attention(q[start:start + query_len], paged.keys[seq], paged.values[seq], positions, scale)
        torch.testing.assert_close(out[start:start + query_len].double(), expected, atol=1e-5, rtol=1e-5)
        start += query_len

    context_lens = [1, 16, 33]
    paged, args = _decode_case(context_lens, block_size, 2 * group, 2, 16, torch.float32, device="cpu")
    out = kernels.decode_attention.paged_decode_attention_torch(*args)
    for seq, length in enumerate(context_lens):
        expected = naive_attention(args[0][seq:seq + 1], paged.keys[seq], paged.values[seq],
                                   torch.tensor([length - 1]), args[-1])
        torch.testing.assert_close(out[seq:seq + 1].double(), expected, atol=1e-5, rtol=1e-5)


def test_torch_prefill_matches_hf_eager_attention(kernels):
    """fp32: the CPU path gives HF's own attention to rounding (prefill without a prefix, GQA 2)."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    query_len, num_heads, num_kv_heads, head_dim = 11, 4, 2, 16
    paged, args = _prefill_case([query_len], [0], 4, num_heads, num_kv_heads, head_dim, torch.float32, device="cpu")
    out = kernels.prefill_attention.paged_prefill_attention_torch(*args)
    module = SimpleNamespace(num_key_value_groups=num_heads // num_kv_heads, training=False)
    causal = torch.full((query_len, query_len), float("-inf")).triu(1)[None, None]
    hf_out, _ = eager_attention_forward(
        module, args[0].transpose(0, 1)[None], paged.keys[0].float().transpose(0, 1)[None],
        paged.values[0].float().transpose(0, 1)[None], causal, scaling=args[-1])
    torch.testing.assert_close(out, hf_out[0], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- sliding window and soft-capping

# Windows: one key, shorter than a page, spanning pages, longer than every sequence.
WINDOWS = [1, 3, 9, 200]
# Page size and dtype in pairs, not crossed: the kernels' paging does not depend on the dtype.
PAGES_AND_DTYPES = [(4, torch.float32), (16, torch.float16)]
# The kernels' cases: every window with and without a soft-cap, the pair alternating so that each window and each
# soft-cap setting meets both page sizes and both dtypes (a tile's scores are soft-capped alike on any page size, in
# either dtype): each case takes about a second of CI under the interpreter.
WINDOWS_SOFTCAPS_PAGES = [(window, softcap, *PAGES_AND_DTYPES[(i + (softcap is not None)) % 2])
                          for i, window in enumerate(WINDOWS) for softcap in (None, 2.0)]


def _poison_pages_before(paged: PagedContexts, seq: int, first_key: int) -> None:
    """Fill with NaN the pages of ``seq`` that hold only keys before ``first_key``: a kernel that reads them (and
    does not skip them) returns NaN."""
    block_size = paged.k_cache.shape[1]
    for page in paged.block_tables[seq, : first_key // block_size].tolist():
        paged.k_cache[page] = float("nan")
        paged.v_cache[page] = float("nan")


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("sliding_window", WINDOWS)
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_windowed_softcapped_torch_references_match_naive_attention(kernels, block_size, sliding_window, softcap):
    """The torch paths (the CPU engine's) against float64 attention, with the pages before each window poisoned."""
    window = dict(sliding_window=sliding_window, softcap=softcap)
    query_lens, prefix_lens = [4, 1, 23], [0, 30, 17]
    paged, args = _prefill_case(query_lens, prefix_lens, block_size, 4, 2, 16, torch.float32, device="cpu")
    for seq, prefix_len in enumerate(prefix_lens):
        _poison_pages_before(paged, seq, max(prefix_len - sliding_window + 1, 0))
    out = kernels.prefill_attention.paged_prefill_attention_torch(*args, **window)
    q, scale, start = args[0], args[-1], 0
    for seq, (query_len, prefix_len) in enumerate(zip(query_lens, prefix_lens)):
        positions = torch.arange(prefix_len, prefix_len + query_len)
        expected = naive_attention(q[start:start + query_len], paged.keys[seq], paged.values[seq], positions, scale,
                                   **window)
        torch.testing.assert_close(out[start:start + query_len].double(), expected, atol=1e-5, rtol=1e-5)
        start += query_len

    context_lens = [1, 16, 33]
    paged, args = _decode_case(context_lens, block_size, 4, 2, 16, torch.float32, device="cpu")
    for seq, length in enumerate(context_lens):
        _poison_pages_before(paged, seq, max(length - sliding_window, 0))
    out = kernels.decode_attention.paged_decode_attention_torch(*args, **window)
    for seq, length in enumerate(context_lens):
        expected = naive_attention(args[0][seq:seq + 1], paged.keys[seq], paged.values[seq],
                                   torch.tensor([length - 1]), args[-1], **window)
        torch.testing.assert_close(out[seq:seq + 1].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sliding_window,softcap,block_size,dtype", WINDOWS_SOFTCAPS_PAGES)
def test_windowed_softcapped_decode_matches_torch(kernels, block_size, sliding_window, softcap, dtype):
    """Split-KV decode over the window only: pages before it are NaN, splits cover the window (1 and 3 splits)."""
    context_lens = [1, 9, 37, 70]
    paged, args = _decode_case(context_lens, block_size, 4, 2, 16, dtype, seed=block_size + sliding_window)
    window = dict(sliding_window=sliding_window, softcap=softcap)
    expected = kernels.decode_attention.paged_decode_attention_torch(*_upcast(args), **window)
    for seq, length in enumerate(context_lens):
        _poison_pages_before(paged, seq, max(length - sliding_window, 0))
    for num_splits in (1, 3):
        out = kernels.decode_attention.paged_decode_attention(*args, **window, num_splits=num_splits)
        torch.testing.assert_close(out.float(), expected, **_tolerance(dtype))
    assert torch.isfinite(kernels.decode_attention.paged_decode_attention(*args, **window)).all()


@pytest.mark.parametrize("sliding_window,softcap,block_size,dtype", WINDOWS_SOFTCAPS_PAGES)
def test_windowed_softcapped_prefill_matches_torch(kernels, block_size, sliding_window, softcap, dtype):
    """Prefill with and without cached prefixes (chunked prefill): no prefix, a short one, and one long enough
    that whole key tiles before the window are skipped (their pages are NaN)."""
    query_lens, prefix_lens = [5, 1, 40, 7], [0, 8, 13, 150]
    paged, args = _prefill_case(query_lens, prefix_lens, block_size, 4, 2, 16, dtype, seed=block_size + sliding_window)
    window = dict(sliding_window=sliding_window, softcap=softcap)
    expected = kernels.prefill_attention.paged_prefill_attention_torch(*_upcast(args), **window)
    # Key tiles are at most 64 keys: those wholly before the last sequence's first window are never read.
    _poison_pages_before(paged, 3, max(150 - sliding_window + 1, 0) // 64 * 64)
    out = kernels.prefill_attention.paged_prefill_attention(*args, **window)
    torch.testing.assert_close(out.float(), expected, **_tolerance(dtype))


def test_windowed_prefill_head_dim_32_rows_that_see_no_key_of_a_tile(kernels):
    """A 32-row query tile with a 5-key window: most rows see none of the tile's first keys (a -inf row max)."""
    paged, args = _prefill_case([64, 33], [0, 70], 8, 4, 2, 32, torch.float32, seed=5)
    out = kernels.prefill_attention.paged_prefill_attention(*args, sliding_window=5, softcap=30.0)
    expected = kernels.prefill_attention.paged_prefill_attention_torch(*args, sliding_window=5, softcap=30.0)
    torch.testing.assert_close(out, expected, **_tolerance(torch.float32))


def test_windowed_softcapped_torch_prefill_matches_hf_eager_attention(kernels):
    """fp32: the CPU path gives HF's eager attention (Gemma 2's) with its sliding-window mask, to rounding."""
    from transformers.masking_utils import sliding_window_causal_mask_function
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    query_len, num_heads, num_kv_heads, head_dim, window, cap = 13, 4, 2, 16, 5, 2.0
    paged, args = _prefill_case([query_len], [0], 4, num_heads, num_kv_heads, head_dim, torch.float32, device="cpu")
    out = kernels.prefill_attention.paged_prefill_attention_torch(*args, sliding_window=window, softcap=cap)
    allowed = sliding_window_causal_mask_function(window)
    positions = torch.arange(query_len)
    mask = allowed(0, 0, positions[:, None], positions[None, :])
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)[None, None]
    module = SimpleNamespace(num_key_value_groups=num_heads // num_kv_heads, training=False, head_dim=head_dim)
    hf_out, _ = eager_attention_forward(
        module, args[0].transpose(0, 1)[None], paged.keys[0].float().transpose(0, 1)[None],
        paged.values[0].float().transpose(0, 1)[None], additive, scaling=args[-1], softcap=cap)
    torch.testing.assert_close(out, hf_out[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("options, match", [
    (dict(sliding_window=0), "sliding_window"), (dict(sliding_window=2.5), "sliding_window"),
    (dict(softcap=0.0), "softcap"), (dict(softcap=-1.0), "softcap"),
])
def test_bad_window_or_softcap_is_a_clear_error(kernels, options, match):
    paged, args = _decode_case([3], 4, 2, 2, 16, torch.float32)
    for attend in (kernels.decode_attention.paged_decode_attention_torch,
                   kernels.decode_attention.paged_decode_attention):
        with pytest.raises(ValueError, match=match):
            attend(*args, **options)


# ---------------------------------------------------------------- slots outside the contexts


def _poison_outside_contexts(paged: PagedContexts, context_lens: list[int]) -> None:
    """NaN in every cache slot no sequence's context holds (page tails, spare pages): what a reused page may hold
    after a model that blew up. Page 0 is first moved to a spare page, so that it is NaN too: a kernel's masked
    lanes read page 0 (their block-table load's fill), and must still not let 0 * NaN through."""
    block_size = paged.k_cache.shape[1]
    tables = paged.block_tables.cpu()
    used = torch.zeros(paged.k_cache.shape[:2], dtype=torch.bool)
    for row, length in enumerate(context_lens):
        positions = torch.arange(length)
        used[tables[row, positions // block_size].long(), positions % block_size] = True
    spare = int((~used.any(dim=1)).nonzero()[0])
    for cache in (paged.k_cache, paged.v_cache):
        cache[spare] = cache[0]
    used[spare], used[0] = used[0].clone(), False
    tables[tables == 0] = spare
    paged.block_tables.copy_(tables.to(paged.block_tables.device))
    for cache in (paged.k_cache, paged.v_cache):
        cache[~used.to(cache.device)] = float("nan")


def _poisoned_case(paged: PagedContexts, args: tuple, context_lens: list[int], fp8: bool) -> tuple[tuple, dict]:
    """The attention inputs with NaN outside the contexts (``_poison_outside_contexts``), quantized to e4m3 when
    ``fp8``; with the keyword arguments (the scales) the attention functions then take."""
    _poison_outside_contexts(paged, context_lens)
    if not fp8:
        return args, {}
    args, kv_scales = _with_fp8_cache(args)
    return args, dict(kv_scales=kv_scales)


@pytest.mark.parametrize("fp8", [False, True])
def test_slots_outside_the_contexts_never_reach_the_output(kernels, fp8):
    """NaN in every slot outside the sequences' contexts, page 0 included: unmasked tiles must never cover one (past
    a context's end) and masked lanes must not let 0 * NaN through, in decode (splits, a window) and prefill. The
    interpreter reads an e4m3 NaN back as 480, so the FP8 case checks NaN only on a GPU (and values everywhere)."""
    lens = [3, 17, 37, 70]
    args, scales = _poisoned_case(*_decode_case(lens, 8, 4, 2, 16, torch.float32, seed=5), lens, fp8)
    decode = kernels.decode_attention
    for options in ({}, dict(sliding_window=9)):
        expected = decode.paged_decode_attention_torch(*args, **options, **scales)
        assert torch.isfinite(expected).all()
        for num_splits in (1, 3):
            out = decode.paged_decode_attention(*args, **options, **scales, num_splits=num_splits)
            torch.testing.assert_close(out, expected, **_tolerance(torch.float32))
    query_lens, prefix_lens = [5, 1, 40], [0, 16, 13]
    lens = [q + p for q, p in zip(query_lens, prefix_lens)]
    args, scales = _poisoned_case(*_prefill_case(query_lens, prefix_lens, 8, 4, 2, 16, torch.float32, seed=6), lens,
                                  fp8)
    prefill = kernels.prefill_attention
    for options in ({}, dict(sliding_window=9)):
        expected = prefill.paged_prefill_attention_torch(*args, **options, **scales)
        assert torch.isfinite(expected).all()
        torch.testing.assert_close(prefill.paged_prefill_attention(*args, **options, **scales), expected,
                                   **_tolerance(torch.float32))


# ---------------------------------------------------------------- FP8 KV cache (e4m3, a key and a value scale per layer)


KV_SCALES = (0.011, 0.0037)  # a cache of randn values spans about +-4: up to ~360 and ~1,100 (saturated) stored


def _with_fp8_cache(args: tuple, cache_positions: tuple[int, int] = (1, 2)) -> tuple[tuple, torch.Tensor]:
    """The same attention inputs with the caches quantized to e4m3 with ``KV_SCALES`` (and those scales)."""
    from hf_minivllm.kernels.kv_cache import quantize_fp8

    kv_scales = torch.tensor(KV_SCALES, dtype=torch.float32, device=args[0].device)
    args = list(args)
    for position, scale in zip(cache_positions, kv_scales):
        args[position] = quantize_fp8(args[position], scale)
    return tuple(args), kv_scales


@pytest.mark.parametrize("head_dim", [16, 40])
def test_store_kvcache_fp8_is_bit_exact_with_torch(kernels, head_dim):
    """Subnormal, tied, binade-crossing and saturating values alike: the Triton store writes torch's bytes (at a
    head of 40 too, not a power of two)."""
    generator = torch.Generator().manual_seed(0)
    num_kv_heads = 2
    magnitudes = torch.logspace(-5, 1.5, 40)[:, None, None]
    key = (torch.randn(40, num_kv_heads, head_dim, generator=generator) * magnitudes).to(DEVICE)
    value = (torch.randn(40, num_kv_heads, head_dim, generator=generator) * magnitudes).to(DEVICE)
    key[0, 0, :4] = torch.tensor([124.5, 31.5, -126.0, 448.0]) * KV_SCALES[0]  # rounding carries into the exponent
    key[0, 1, :2] = torch.tensor([-0.0, -1e-9])  # signed zeros as torch stores them
    key[0, 1, 3:5] = torch.tensor([float("inf"), float("-inf")])  # saturate to +-448
    if CUDA:  # NaN stays NaN (the interpreter's own cast turns NaN into 384, so only the GPU can show it)
        key[0, 1, 2] = float("nan")
    slots = torch.randperm(64, generator=generator)[:40].to(DEVICE)
    slots[5] = -1
    kv_scales = torch.tensor(KV_SCALES, dtype=torch.float32, device=DEVICE)
    caches = [torch.zeros(16, 4, num_kv_heads, head_dim, dtype=torch.float8_e4m3fn, device=DEVICE) for _ in range(4)]
    kernels.kv_cache.store_kvcache(key, value, caches[0], caches[1], slots, kv_scales)
    kernels.kv_cache.store_kvcache_torch(key, value, caches[2], caches[3], slots, kv_scales)
    assert torch.equal(caches[0].view(torch.uint8), caches[2].view(torch.uint8))
    assert torch.equal(caches[1].view(torch.uint8), caches[3].view(torch.uint8))
    assert caches[1].float().abs().max() == kernels.kv_cache.FP8_MAX, "values past the range saturate"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", [{}, dict(sliding_window=9, softcap=30.0)])
def test_fp8_decode_matches_torch(kernels, dtype, options):
    paged, args = _decode_case([1, 17, 40, 70], 8, 4, 2, 16, dtype, seed=11)
    args, kv_scales = _with_fp8_cache(args)
    expected = kernels.decode_attention.paged_decode_attention_torch(*_upcast(args), **options, kv_scales=kv_scales)
    for num_splits in (1, 3):
        out = kernels.decode_attention.paged_decode_attention(*args, **options, kv_scales=kv_scales,
                                                              num_splits=num_splits)
        torch.testing.assert_close(out.float(), expected, **_tolerance(dtype))


def test_fp8_decode_keeps_a_nan_query_nan(kernels):
    """A 16-bit query is saturated to fp16's range for the FP8 cache's dots; a NaN (a model that blew up) must
    still come out NaN, as the 16-bit cache and the torch path give it, not as a finite answer."""
    paged, args = _decode_case([5, 17], 8, 4, 2, 16, torch.bfloat16, seed=13)
    args, kv_scales = _with_fp8_cache(args)
    q = args[0].clone()
    q[1, 0, 3] = float("nan")
    out = kernels.decode_attention.paged_decode_attention(q, *args[1:], kv_scales=kv_scales)
    assert out[1, 0].isnan().all() and not out[0].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", [{}, dict(sliding_window=9, softcap=30.0)])
def test_fp8_prefill_matches_torch(kernels, dtype, options):
    paged, args = _prefill_case([5, 1, 40], [0, 8, 13], 8, 4, 2, 16, dtype, seed=12)
    args, kv_scales = _with_fp8_cache(args)
    out = kernels.prefill_attention.paged_prefill_attention(*args, **options, kv_scales=kv_scales)
    expected = kernels.prefill_attention.paged_prefill_attention_torch(*_upcast(args), **options, kv_scales=kv_scales)
    torch.testing.assert_close(out.float(), expected, **_tolerance(dtype))


def test_fp8_cache_attention_stays_close_to_full_precision(kernels):
    """The torch reference reads an FP8 cache back as stored * scale: attention then differs from the
    full-precision cache's by e4m3's rounding (3 mantissa bits), and a wrong scale shows."""
    paged, args = _decode_case([20, 64], 8, 4, 2, 16, torch.float32, seed=13)
    kv_scales = torch.full((2,), 0.02, device=args[0].device)  # randn values stay well inside e4m3's range
    quantized = tuple(kernels.kv_cache.quantize_fp8(cache, kv_scales[0]) for cache in args[1:3])
    fp8_args = (args[0], *quantized, *args[3:])
    exact = kernels.decode_attention.paged_decode_attention_torch(*args)
    approx = kernels.decode_attention.paged_decode_attention_torch(*fp8_args, kv_scales=kv_scales)
    torch.testing.assert_close(approx, exact, atol=0.06, rtol=0.06)
    wrong = kernels.decode_attention.paged_decode_attention_torch(*fp8_args, kv_scales=kv_scales * 2)
    assert not torch.allclose(wrong, exact, atol=0.06, rtol=0.06)


def test_fp8_cache_without_scales_is_a_clear_error(kernels):
    paged, args = _decode_case([5], 8, 4, 2, 16, torch.float32)
    args, kv_scales = _with_fp8_cache(args)
    with pytest.raises(ValueError, match="kv_scales"):
        kernels.decode_attention.paged_decode_attention(*args)
    with pytest.raises(ValueError, match="kv_scales"):
        kernels.decode_attention.paged_decode_attention_torch(*args, kv_scales=kv_scales.double())


# ---------------------------------------------------------------- heads that are not a power of two

# (head_dim, group, block_size, dtype, options): Phi-3-mini's 96, 80, 40 and 24, whose tiles span the next power of
# two, masked along the head. One case per option family (window, soft-cap, GQA groups, 3 not a power of two
# either), spread over head sizes, page sizes and dtypes rather than crossed with them: the interpreter is slow.
# The widest head this module launches is a padded one (96), so the compile test's covering set, which takes each
# kernel's largest HEAD_DIM, compiles a padded variant of every attention kernel.
PADDED_HEADS = [
    (24, 1, 4, torch.float16, {}),
    (40, 3, 8, torch.float16, dict(sliding_window=9, softcap=2.0)),
    (80, 2, 16, torch.float32, dict(sliding_window=3)),
    (96, 4, 16, torch.float32, dict(softcap=2.0)),
]


def _nan_padded(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a view of a buffer whose rows continue with NaN up to the next power of two (the kernels' tile
    width): a kernel that reads past the head gets NaN, one that writes past it leaves a number there."""
    head_dim = tensor.shape[-1]
    buffer = torch.full((*tensor.shape[:-1], 1 << (head_dim - 1).bit_length()), float("nan"), dtype=tensor.dtype,
                        device=tensor.device)
    buffer[..., :head_dim] = tensor
    return buffer[..., :head_dim]


def _attend_with_nan_past_the_head(attend: Callable[..., torch.Tensor], q: torch.Tensor, *args,
                                   **kwargs) -> torch.Tensor:
    """``attend(q, *args, **kwargs)`` with ``q`` and the output (the ``torch.empty_like`` the attention functions
    allocate it with) both NaN past the head (``_nan_padded``); checks that the output's NaN lanes were not written."""
    outputs = []
    empty_like = torch.empty_like

    def nan_padded_empty_like(tensor: torch.Tensor, *like_args, **like_kwargs) -> torch.Tensor:
        outputs.append(_nan_padded(empty_like(tensor, *like_args, **like_kwargs)))
        return outputs[-1]

    with mock.patch.object(torch, "empty_like", nan_padded_empty_like):
        out = attend(_nan_padded(q), *args, **kwargs)
    assert outputs and out is outputs[0]
    assert out._base[..., out.shape[-1]:].isnan().all(), "a store wrote past the head"
    return out


@pytest.mark.parametrize("head_dim,group,block_size,dtype,options", PADDED_HEADS, ids=str)
def test_decode_padded_heads_match_torch(kernels, head_dim, group, block_size, dtype, options):
    """Split-KV decode (one split, and three merged) with NaN in every cache slot outside the contexts and past the
    query's and the output's heads: the lanes past the head must read as 0 and never be stored."""
    lens = [1, 9, 37, 70]
    args, _ = _poisoned_case(*_decode_case(lens, block_size, 2 * group, 2, head_dim, dtype, seed=head_dim), lens,
                             fp8=False)
    module = kernels.decode_attention
    expected = module.paged_decode_attention_torch(*_upcast(args), **options)
    assert torch.isfinite(expected).all()
    for num_splits in (1, 3):
        out = _attend_with_nan_past_the_head(module.paged_decode_attention, *args, **options, num_splits=num_splits)
        torch.testing.assert_close(out.float(), expected, **_tolerance(dtype))


@pytest.mark.parametrize("head_dim,group,block_size,dtype,options", PADDED_HEADS, ids=str)
def test_prefill_padded_heads_match_torch(kernels, head_dim, group, block_size, dtype, options):
    """Prefill with and without cached prefixes, NaN outside the contexts and past the heads (see the decode's)."""
    query_lens, prefix_lens = [5, 1, 40, 7], [0, 8, 13, 70]
    lens = [q + p for q, p in zip(query_lens, prefix_lens)]
    args, _ = _poisoned_case(*_prefill_case(query_lens, prefix_lens, block_size, 2 * group, 2, head_dim, dtype,
                                            seed=head_dim), lens, fp8=False)
    module = kernels.prefill_attention
    expected = module.paged_prefill_attention_torch(*_upcast(args), **options)
    assert torch.isfinite(expected).all()
    out = _attend_with_nan_past_the_head(module.paged_prefill_attention, *args, **options)
    torch.testing.assert_close(out.float(), expected, **_tolerance(dtype))


@pytest.mark.parametrize("head_dim,dtype,options", [(24, torch.float32, {}),
                                                    (40, torch.float16, dict(sliding_window=9, softcap=30.0))],
                         ids=str)
def test_fp8_padded_heads_match_torch(kernels, head_dim, dtype, options):
    """An FP8 cache's tiles (converted to the query's dtype) at heads that are not a power of two, decode and
    prefill. (The interpreter reads an e4m3 NaN back as 480: no NaN in the cache here.)"""
    args, kv_scales = _with_fp8_cache(_decode_case([1, 17, 40, 70], 8, 4, 2, head_dim, dtype, seed=head_dim)[1])
    decode = kernels.decode_attention
    expected = decode.paged_decode_attention_torch(*_upcast(args), **options, kv_scales=kv_scales)
    for num_splits in (1, 3):
        out = _attend_with_nan_past_the_head(decode.paged_decode_attention, *args, **options, kv_scales=kv_scales,
                                             num_splits=num_splits)
        torch.testing.assert_close(out.float(), expected, **_tolerance(dtype))
    args, kv_scales = _with_fp8_cache(_prefill_case([5, 1, 40], [0, 8, 13], 8, 4, 2, head_dim, dtype,
                                                    seed=head_dim)[1])
    prefill = kernels.prefill_attention
    expected = prefill.paged_prefill_attention_torch(*_upcast(args), **options, kv_scales=kv_scales)
    out = _attend_with_nan_past_the_head(prefill.paged_prefill_attention, *args, **options, kv_scales=kv_scales)
    torch.testing.assert_close(out.float(), expected, **_tolerance(dtype))


@pytest.mark.parametrize("head_dim,group,dtype,softcap", [(24, 4, torch.float32, 30.0), (96, 2, torch.float16, None)],
                         ids=str)
def test_cascade_decode_padded_heads_match_torch(kernels, head_dim, group, dtype, softcap):
    """The cascade's prefix tiles at heads that are not a power of two: 17 sequences (two tiles of queries) over a
    shared prefix of 5 pages."""
    block_size, num_kv_heads = 8, 2
    args = _shared_prefix_case([41 + 4 * index for index in range(17)], 5, block_size, num_kv_heads * group,
                               num_kv_heads, head_dim, dtype, seed=head_dim)
    module = kernels.decode_attention
    expected = module.paged_decode_attention_torch(*_upcast(args), 0.25, softcap=softcap)
    out = _attend_with_nan_past_the_head(module.cascade_decode_attention, *args, 0.25, _prefix_len(5 * block_size),
                                         softcap=softcap)
    torch.testing.assert_close(out.float(), expected, **_tolerance(dtype))


@pytest.mark.parametrize("head_dim", [8, 12, 100, 264])
def test_heads_the_kernels_cannot_take_are_a_clear_error(kernels, head_dim):
    paged, args = _decode_case([3], 4, 2, 2, head_dim, torch.float32)
    with pytest.raises(ValueError, match=f"multiple of 8 from 16 to 256, got head_dim {head_dim}"):
        kernels.decode_attention.paged_decode_attention(*args)
    paged, args = _prefill_case([3], [0], 4, 2, 2, head_dim, torch.float32)
    with pytest.raises(ValueError, match=f"multiple of 8 from 16 to 256, got head_dim {head_dim}"):
        kernels.prefill_attention.paged_prefill_attention(*args)


# ---------------------------------------------------------------- RMSNorm and SiLU-and-mul


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [48, 100])
def test_rms_norm_matches_torch(kernels, dtype, hidden):
    x = torch.randn(6, hidden).to(dtype).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(hidden)).to(dtype).to(DEVICE)
    out = kernels.rms_norm.rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(out, kernels.rms_norm.rms_norm_torch(x, weight, 1e-6), **_tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_add_rms_norm_matches_torch(kernels, dtype):
    x, residual = (torch.randn(5, 64).to(dtype).to(DEVICE) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(64)).to(dtype).to(DEVICE)
    normed, residual_out = kernels.rms_norm.fused_add_rms_norm(x, residual, weight, 1e-5)
    expected_normed, expected_residual = kernels.rms_norm.fused_add_rms_norm_torch(x, residual, weight, 1e-5)
    torch.testing.assert_close(residual_out, expected_residual, atol=0, rtol=0)
    torch.testing.assert_close(normed, expected_normed, **_tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [64, 80])
def test_gemma_rms_norm_matches_torch(kernels, dtype, hidden):
    """unit_offset (Gemma): alone and fused with the residual add; the output keeps the input dtype."""
    x, residual = (torch.randn(5, hidden).to(dtype).to(DEVICE) for _ in range(2))
    weight = (0.1 * torch.randn(hidden)).to(dtype).to(DEVICE)  # an offset from 1
    out = kernels.rms_norm.rms_norm(x, weight, 1e-6, unit_offset=True)
    assert out.dtype == dtype
    torch.testing.assert_close(out, kernels.rms_norm.rms_norm_torch(x, weight, 1e-6, True), **_tolerance(dtype))
    normed, residual_out = kernels.rms_norm.fused_add_rms_norm(x, residual, weight, 1e-6, unit_offset=True)
    expected_normed, expected_residual = kernels.rms_norm.fused_add_rms_norm_torch(x, residual, weight, 1e-6, True)
    torch.testing.assert_close(residual_out, expected_residual, atol=0, rtol=0)
    torch.testing.assert_close(normed, expected_normed, **_tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_rms_norm_torch_is_bit_exact_with_hf(dtype):
    """The torch path (CPU, and the reference) rounds exactly as HF's Gemma2RMSNorm / Gemma3RMSNorm."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    from hf_minivllm.kernels.rms_norm import rms_norm_torch
    from hf_minivllm.layers.layernorm import RMSNorm

    x = (3 * torch.randn(7, 48)).to(dtype)
    for hf_class in (Gemma2RMSNorm, Gemma3RMSNorm):
        hf_norm = hf_class(48, eps=1e-6).to(dtype)
        with torch.no_grad():
            hf_norm.weight.normal_(0.0, 0.5)
        ours = RMSNorm(48, 1e-6, unit_offset=True)
        ours.weight = hf_norm.weight
        with torch.no_grad():
            assert torch.equal(ours(x), hf_norm(x))
            assert torch.equal(rms_norm_torch(x, hf_norm.weight, 1e-6, unit_offset=True), hf_norm(x))
            residual = torch.randn(7, 48).to(dtype)
            normed, summed = ours(x, residual)
            assert torch.equal(summed, residual + x) and torch.equal(normed, hf_norm(residual + x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("intermediate", [40, 1500])
def test_silu_and_mul_matches_torch(kernels, dtype, intermediate):
    x = torch.randn(3, 2 * intermediate).to(dtype).to(DEVICE)
    out = kernels.activation.silu_and_mul(x)
    torch.testing.assert_close(out, kernels.activation.silu_and_mul_torch(x), **_tolerance(dtype))


# ---------------------------------------------------------------- GPU sweeps (bf16/fp16, realistic shapes)


def _assert_close_to_fp32_reference(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """bf16/fp16 kernels vs an fp32 reference on the same rounded inputs: relative Frobenius error."""
    error = (out.float() - expected).norm() / expected.norm()
    assert error < (1e-2 if dtype == torch.bfloat16 else 2e-3), f"relative error {error:.2e}"
    assert torch.isfinite(out).all()


GPU_DTYPES = [torch.bfloat16, torch.float16]


def _captured(step):
    """``step`` run once on a side stream (its kernels compile outside the capture), then captured: (graph, output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = step()
    return graph, graph_out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 8])
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
def test_gpu_decode_sweep(kernels, block_size, group, head_dim, dtype):
    generator = torch.Generator().manual_seed(block_size + group)
    context_lens = [1, 17, 4096, *torch.randint(1, 4097, (13,), generator=generator).tolist()]
    num_kv_heads = 2
    paged, args = _decode_case(context_lens, block_size, num_kv_heads * group, num_kv_heads, head_dim, dtype,
                               seed=block_size * group)
    expected = kernels.decode_attention.paged_decode_attention_torch(*_upcast(args))
    for num_splits in (None, 1, 7):
        out = kernels.decode_attention.paged_decode_attention(*args, num_splits=num_splits)
        _assert_close_to_fp32_reference(out, expected, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("with_prefix", [False, True])
@pytest.mark.parametrize("group", [1, 2, 8])
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
def test_gpu_prefill_sweep(kernels, block_size, group, with_prefix, head_dim, dtype):
    query_lens = [1, 127, 1000, 2048]
    prefix_lens = [4095, 1, 2000, 2048] if with_prefix else [0, 0, 0, 0]
    num_kv_heads = 2
    paged, args = _prefill_case(query_lens, prefix_lens, block_size, num_kv_heads * group, num_kv_heads, head_dim,
                                dtype, seed=block_size + group)
    out = kernels.prefill_attention.paged_prefill_attention(*args)
    expected = kernels.prefill_attention.paged_prefill_attention_torch(*_upcast(args))
    _assert_close_to_fp32_reference(out, expected, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("head_dim", [80, 96, 192])
def test_gpu_padded_heads_match_torch(kernels, head_dim, dtype):
    """Heads that are not a power of two (Phi-3-mini's 96) at realistic lengths: split decode (the heuristic's
    splits, one, seven), prefill with and without prefixes, an FP8 cache, and the cascade over a shared prefix."""
    generator = torch.Generator().manual_seed(head_dim)
    context_lens = [1, 17, 4096, *torch.randint(1, 4097, (13,), generator=generator).tolist()]
    paged, args = _decode_case(context_lens, 16, 32, 8, head_dim, dtype, seed=head_dim)
    decode = kernels.decode_attention
    expected = decode.paged_decode_attention_torch(*_upcast(args))
    for num_splits in (None, 1, 7):
        _assert_close_to_fp32_reference(decode.paged_decode_attention(*args, num_splits=num_splits), expected, dtype)
    fp8_args, kv_scales = _with_fp8_cache(args)
    _assert_close_to_fp32_reference(decode.paged_decode_attention(*fp8_args, kv_scales=kv_scales),
                                    decode.paged_decode_attention_torch(*_upcast(fp8_args), kv_scales=kv_scales),
                                    dtype)
    paged, args = _prefill_case([1, 127, 1000, 2048], [4095, 1, 0, 2048], 16, 32, 8, head_dim, dtype, seed=head_dim)
    prefill = kernels.prefill_attention
    _assert_close_to_fp32_reference(prefill.paged_prefill_attention(*args),
                                    prefill.paged_prefill_attention_torch(*_upcast(args)), dtype)
    lens = (2048 + torch.randint(1, 200, (40,), generator=generator)).tolist()
    args = _shared_prefix_case(lens, 128, 16, 32, 8, head_dim, dtype, seed=head_dim)
    _assert_close_to_fp32_reference(decode.cascade_decode_attention(*args, 0.088, _prefix_len(2048)),
                                    decode.paged_decode_attention_torch(*_upcast(args), 0.088), dtype)


@pytest.mark.gpu
def test_gpu_fp32_kernels_match_torch(kernels):
    """fp32 models on CUDA: full-precision dots (no tf32)."""
    paged, args = _decode_case([3, 300, 1000], 16, 8, 2, 128, torch.float32)
    torch.testing.assert_close(kernels.decode_attention.paged_decode_attention(*args),
                               kernels.decode_attention.paged_decode_attention_torch(*args), atol=1e-4, rtol=1e-4)
    paged, args = _prefill_case([100, 257], [0, 300], 16, 8, 2, 128, torch.float32)
    torch.testing.assert_close(kernels.prefill_attention.paged_prefill_attention(*args),
                               kernels.prefill_attention.paged_prefill_attention_torch(*args), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_gpu_decode_and_store_capture_in_cuda_graph(kernels):
    """Graph-captured store + decode replays correctly after the metadata tensors change in place."""
    num_heads, num_kv_heads, head_dim, block_size = 16, 8, 128, 16
    paged, args = _decode_case([100, 500, 2000, 7], block_size, num_heads, num_kv_heads, head_dim, torch.bfloat16)
    q, k_cache, v_cache, context_lens, block_tables, scale = args
    new_k = torch.randn(4, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    new_v = torch.randn_like(new_k)
    slots = torch.full((4,), -1, dtype=torch.int64, device="cuda")

    def step() -> torch.Tensor:
        kernels.kv_cache.store_kvcache(new_k, new_v, k_cache, v_cache, slots)
        return kernels.decode_attention.paged_decode_attention(q, k_cache, v_cache, context_lens, block_tables, scale)

    graph, graph_out = _captured(step)
    context_lens.copy_(torch.tensor([101, 480, 1999, 8], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    expected = kernels.decode_attention.paged_decode_attention_torch(*_upcast(args))
    _assert_close_to_fp32_reference(graph_out, expected, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_padded_prefill_replays_in_a_cuda_graph_with_new_sequences(kernels):
    """A captured prefill (grid sized for 256 tokens per sequence, 6 sequence slots) replays correctly when the
    sequences' bounds, block tables and pages change in place, fewer or more of the slots holding tokens."""
    num_heads, num_kv_heads, head_dim, block_size, tokens, slots = 16, 8, 128, 16, 256, 6
    cases = [_prefill_case(query_lens, prefix_lens, block_size, num_heads, num_kv_heads, head_dim, torch.bfloat16,
                           seed=seed)[1]
             for query_lens, prefix_lens, seed in (([100, 3, 60], [0, 40, 500], 0),
                                                  ([7, 1, 1, 90, 40], [300, 20, 0, 1000, 16], 9))]
    num_blocks = max(case[1].shape[0] for case in cases)
    width = max(case[7].shape[1] for case in cases)
    q = torch.zeros(tokens, num_heads, head_dim, dtype=torch.bfloat16, device="cuda")
    k_cache = torch.zeros(num_blocks, *cases[0][1].shape[1:], dtype=torch.bfloat16, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    cu_q = torch.zeros(slots + 1, dtype=torch.int32, device="cuda")
    cu_k = torch.zeros_like(cu_q)
    block_tables = torch.zeros(slots, width, dtype=torch.int32, device="cuda")
    scale = head_dim ** -0.5

    def step() -> torch.Tensor:
        return kernels.prefill_attention.paged_prefill_attention(q, k_cache, v_cache, cu_q, cu_k, tokens, 8192,
                                                                 block_tables, scale)

    graph, graph_out = _captured(step)
    for case in (cases[1], cases[0]):
        padded = _padded_as_a_prefill_graph_runs_it(case, tokens - case[0].shape[0], slots + 1 - case[3].shape[0],
                                                    tokens)
        q.copy_(padded[0])
        k_cache[: case[1].shape[0]].copy_(case[1])
        v_cache[: case[2].shape[0]].copy_(case[2])
        cu_q.copy_(padded[3])
        cu_k.copy_(padded[4])
        block_tables.zero_()
        block_tables[:, : padded[7].shape[1]] = padded[7]
        graph.replay()
        torch.cuda.synchronize()
        expected = kernels.prefill_attention.paged_prefill_attention_torch(*_upcast(case))
        _assert_close_to_fp32_reference(graph_out[: case[0].shape[0]], expected, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_kernels_address_caches_beyond_2_to_the_31_elements(kernels):
    """Pages past element 2**31 (a >4 GB bf16 cache): offsets must be computed in int64."""
    num_kv_heads, head_dim, block_size = 8, 128, 16
    per_block = block_size * num_kv_heads * head_dim
    num_blocks = (1 << 31) // per_block + 8
    k_cache = torch.empty(num_blocks, block_size, num_kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.empty_like(k_cache)
    last_pages = torch.arange(num_blocks - 4, num_blocks, dtype=torch.int32, device="cuda")
    tokens = 4 * block_size
    key, value = (torch.randn(tokens, num_kv_heads, head_dim, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    slots = (last_pages.to(torch.int64)[:, None] * block_size + torch.arange(block_size, device="cuda")).flatten()
    kernels.kv_cache.store_kvcache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache[-4:].flatten(0, 1), key)
    q = torch.randn(1, 16, head_dim, dtype=torch.bfloat16, device="cuda")
    context_lens = torch.tensor([tokens], dtype=torch.int32, device="cuda")
    out = kernels.decode_attention.paged_decode_attention(q, k_cache, v_cache, context_lens, last_pages[None], 0.1)
    expected = naive_attention(q[0:1].cpu(), key.cpu(), value.cpu(), torch.tensor([tokens - 1]), 0.1)
    _assert_close_to_fp32_reference(out.cpu(), expected.float(), torch.bfloat16)
    cu = torch.tensor([0, tokens], dtype=torch.int32, device="cuda")
    q_prefill = torch.randn(tokens, 16, head_dim, dtype=torch.bfloat16, device="cuda")
    out = kernels.prefill_attention.paged_prefill_attention(q_prefill, k_cache, v_cache, cu, cu, tokens, tokens,
                                                            last_pages[None], 0.1)
    expected = naive_attention(q_prefill.cpu(), key.cpu(), value.cpu(), torch.arange(tokens), 0.1)
    _assert_close_to_fp32_reference(out.cpu(), expected.float(), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_norm_and_activation_match_torch(kernels, dtype):
    x, residual = (torch.randn(257, 4096, dtype=dtype, device="cuda") for _ in range(2))
    weight = 1 + 0.1 * torch.randn(4096, dtype=dtype, device="cuda")
    torch.testing.assert_close(kernels.rms_norm.rms_norm(x, weight, 1e-6),
                               kernels.rms_norm.rms_norm_torch(x, weight, 1e-6), **_tolerance(dtype))
    normed, residual_out = kernels.rms_norm.fused_add_rms_norm(x, residual, weight, 1e-6)
    expected_normed, expected_residual = kernels.rms_norm.fused_add_rms_norm_torch(x, residual, weight, 1e-6)
    assert torch.equal(residual_out, expected_residual)
    torch.testing.assert_close(normed, expected_normed, **_tolerance(dtype))
    gate_up = torch.randn(257, 2 * 3072, dtype=dtype, device="cuda")
    torch.testing.assert_close(kernels.activation.silu_and_mul(gate_up),
                               kernels.activation.silu_and_mul_torch(gate_up), **_tolerance(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("batch,group", [(256, 2), (40, 4)])
def test_gpu_cascade_decode_at_w3_shapes(kernels, dtype, batch, group):
    """W3's shape (a 2,048-token prefix in pages of 16, then 1-200 own tokens; the 0.6B's and the 8B's head groups)
    against the fp32 reference on the same rounded inputs, and beside the plain split kernel."""
    generator = torch.Generator().manual_seed(batch)
    lens = (2048 + torch.randint(1, 200, (batch,), generator=generator)).tolist()
    args = _shared_prefix_case(lens, 128, 16, 8 * group, 8, 128, dtype, seed=batch)
    module = kernels.decode_attention
    expected = module.paged_decode_attention_torch(*_upcast(args), 0.088)
    cascade = module.cascade_decode_attention(*args, 0.088, _prefix_len(2048))
    _assert_close_to_fp32_reference(cascade, expected, dtype)
    plain = module.paged_decode_attention(*args, 0.088)
    assert (cascade.float() - plain.float()).abs().max() < (2e-2 if dtype == torch.bfloat16 else 2e-3)


def test_one_shot_all_reduce_as_rank_0_of_two(kernels):
    """Rank 0's side of the peer all-reduce, rank 1 played by hand: its staging half and flags set for each call.
    Checks the sum (rank order, float32), the announced flags, the staging half by epoch parity and the counters.
    The cross-GPU synchronisation itself is exercised by the two-GPU tests."""
    ar = kernels.all_reduce
    half_bytes = 4096 * 4
    staging = [torch.zeros(2 * half_bytes, dtype=torch.uint8, device=DEVICE) for _ in range(2)]
    flags = [torch.zeros(2 * ar.GRID, dtype=torch.int32, device=DEVICE) for _ in range(2)]
    epochs = torch.zeros(ar.GRID, dtype=torch.int32, device=DEVICE)
    staging_ptrs = torch.tensor([t.data_ptr() for t in staging], dtype=torch.int64, device=DEVICE)
    flag_ptrs = torch.tensor([t.data_ptr() for t in flags], dtype=torch.int64, device=DEVICE)
    generator = torch.Generator().manual_seed(0)
    for call, n in enumerate([3000, 77, 4096, 1], start=1):
        mine, peers = (torch.randn(n, generator=generator).to(DEVICE) for _ in range(2))
        half = (call % 2) * 4096
        staging[1].view(torch.float32)[half : half + n] = peers
        flags[0][ar.GRID :] = call  # rank 1 announced this call
        x = mine.clone()
        ar.one_shot_all_reduce(x, staging_ptrs, flag_ptrs, epochs, half_bytes, rank=0)
        assert torch.equal(x, ar.all_reduce_torch([mine, peers]))
        assert torch.equal(staging[0].view(torch.float32)[half : half + n], mine)
        assert (flags[1][: ar.GRID] == call).all() and (epochs == call).all()
    # Across the int32 counter's overflow: the call after 2**31 - 1 waits for its own flag and uses the other half.
    epochs.fill_(2**31 - 2)
    for call in (2**31 - 1, -(2**31), -(2**31) + 1):  # the last: `epoch % 2` would be -1, before the buffer
        mine, peers = (torch.randn(64, generator=generator).to(DEVICE) for _ in range(2))
        half = (call & 1) * 4096
        staging[1].view(torch.float32)[half : half + 64] = peers
        flags[0][ar.GRID :] = call
        x = mine.clone()
        ar.one_shot_all_reduce(x, staging_ptrs, flag_ptrs, epochs, half_bytes, rank=0)
        assert torch.equal(x, ar.all_reduce_torch([mine, peers])) and (epochs == call).all()
    with pytest.raises(ValueError, match="at most 16384 bytes"):
        ar.one_shot_all_reduce(torch.zeros(4097, device=DEVICE), staging_ptrs, flag_ptrs, epochs, half_bytes, 0)


# ---------------------------------------------------------------- fused MoE


def _moe_case(num_tokens: int, top_k: int, num_experts: int = 8, hidden: int = 64, intermediate: int = 32,
              dtype: torch.dtype = torch.float32, device: str = DEVICE, seed: int = 0, experts_used=None):
    """Inputs of ``fused_moe``: random tokens and experts, routing weights renormalised over each token's top-k
    (``experts_used``: route only to those experts, the others get no token)."""
    generator = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(num_tokens, hidden, generator=generator)
    gate_up = torch.randn(num_experts, 2 * intermediate, hidden, generator=generator) * 0.1
    down = torch.randn(num_experts, hidden, intermediate, generator=generator) * 0.1
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    if experts_used is not None:
        blocked = torch.ones(num_experts, dtype=torch.bool)
        blocked[list(experts_used)] = False
        logits[:, blocked] = float("-inf")
    weights, ids = torch.topk(logits.softmax(-1), top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    tensors = [hidden_states, gate_up, down, weights]
    return (*(t.to(dtype).to(device) for t in tensors), ids.to(device))


def _naive_moe(hidden_states, gate_up, down, weights, ids) -> torch.Tensor:
    """Pair by pair in float64: sum_k w * down(silu(gate x) * up x)."""
    out = torch.zeros(hidden_states.shape, dtype=torch.float64)
    for token in range(ids.shape[0]):
        x = hidden_states[token].double().cpu()
        for slot in range(ids.shape[1]):
            expert = int(ids[token, slot])
            gate, up = (gate_up[expert].double().cpu() @ x).chunk(2)
            out[token] += float(weights[token, slot]) * (down[expert].double().cpu() @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("num_tokens", [1, 5, 33])
def test_moe_reference_matches_naive_float64(num_tokens, top_k):
    args = _moe_case(num_tokens, top_k, device="cpu")
    fused_moe = importlib.import_module("hf_minivllm.kernels.fused_moe")
    torch.testing.assert_close(fused_moe.fused_moe_torch(*args).double(), _naive_moe(*args), atol=1e-5, rtol=1e-5)


# bf16 compiled only: Triton's interpreter computes bf16 dots wrongly (values of 1e10 from unit inputs, 3.9).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16,
                                   pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
                                       not CUDA or os.environ.get("TRITON_INTERPRET") == "1",
                                       reason="Triton's interpreter gets bf16 dots wrong"))])
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("num_tokens", [1, 7, 70])
def test_fused_moe_matches_torch(kernels, num_tokens, top_k, dtype):
    args = _moe_case(num_tokens, top_k, dtype=dtype, seed=num_tokens + top_k)
    got = kernels.fused_moe.fused_moe(*args)
    expected = kernels.fused_moe.fused_moe_torch(*args)
    assert got.shape == expected.shape and got.dtype == dtype
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else _tolerance(dtype)
    torch.testing.assert_close(got, expected, **tolerance)


def test_fused_moe_with_idle_experts_odd_sizes_and_strided_weights(kernels):
    """Experts that get no token, sizes that fill no block, a down projection sliced as a TP shard (strided)."""
    hidden_states, gate_up, down, weights, ids = _moe_case(19, 2, num_experts=12, hidden=40, intermediate=24,
                                                           experts_used=[1, 6, 7, 11])
    shard = torch.cat([down, down], dim=2)[..., 24:]  # a column slice: strides of the unsharded tensor
    assert not shard.is_contiguous()
    got = kernels.fused_moe.fused_moe(hidden_states, gate_up, shard, weights, ids)
    torch.testing.assert_close(got, kernels.fused_moe.fused_moe_torch(hidden_states, gate_up, down, weights, ids),
                               atol=1e-5, rtol=1e-5)
    empty = kernels.fused_moe.fused_moe(hidden_states[:0], gate_up, down, weights[:0], ids[:0])
    assert empty.shape == (0, 40)


def test_moe_alignment_groups_pairs_by_expert_in_shapes_known_from_the_sizes(kernels):
    """Every pair once, each block one expert's, padding past the pairs; the same shapes whatever the routing (a
    captured CUDA graph stays valid)."""
    align = kernels.fused_moe.align_pairs_by_expert
    num_tokens, top_k, num_experts, block_m = 10, 2, 8, 16
    shapes = set()
    for seed, used in [(0, None), (1, [3]), (2, [0, 7])]:
        *_, ids = _moe_case(num_tokens, top_k, num_experts=num_experts, seed=seed, experts_used=used)
        sorted_pairs, block_experts = align(ids, num_experts, block_m)
        shapes.add((tuple(sorted_pairs.shape), tuple(block_experts.shape)))
        pairs = sorted_pairs.view(-1, block_m).cpu()
        flat_ids = ids.reshape(-1).cpu()
        real = pairs[pairs < num_tokens * top_k]
        assert sorted(real.tolist()) == list(range(num_tokens * top_k))
        for block, expert in enumerate(block_experts.cpu().tolist()):
            members = pairs[block][pairs[block] < num_tokens * top_k]
            if expert == num_experts:
                assert members.numel() == 0
            else:
                assert members.numel() > 0 and (flat_ids[members.long()] == expert).all()
    assert len(shapes) == 1
    assert shapes.pop()[0][0] == kernels.fused_moe.padded_pair_bound(num_tokens * top_k, num_experts, block_m)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 16, 300, 4096])
def test_gpu_fused_moe_matches_torch_at_qwen3_30b_a3b_shapes(kernels, num_tokens, dtype):
    """At real widths (K = 2,048 and 768) the two paths sum in different orders (Triton tiles, cuBLAS) and round
    each GEMM to the 16-bit dtype before the product, so an intermediate may land one unit in the last place apart
    and carry into the output: fp16 was seen 2 ulps apart on 14 of 614,400 values (on an H100), hence the bf16
    tolerance for both 16-bit dtypes here."""
    args = _moe_case(num_tokens, 8, num_experts=128, hidden=2048, intermediate=768, dtype=dtype, seed=num_tokens)
    got = kernels.fused_moe.fused_moe(*args)
    expected = kernels.fused_moe.fused_moe_torch(*args)
    torch.testing.assert_close(got, expected, **_tolerance(torch.bfloat16 if dtype == torch.float16 else dtype))


@pytest.mark.gpu
def test_gpu_fused_moe_replays_in_a_cuda_graph_with_new_routing(kernels):
    hidden_states, gate_up, down, weights, ids = _moe_case(8, 2, dtype=torch.bfloat16)

    def step() -> torch.Tensor:
        return kernels.fused_moe.fused_moe(hidden_states, gate_up, down, weights, ids)

    graph, graph_out = _captured(step)
    _, _, _, new_weights, new_ids = _moe_case(8, 2, dtype=torch.bfloat16, seed=5, experts_used=[2, 4])
    weights.copy_(new_weights)
    ids.copy_(new_ids)
    graph.replay()
    torch.cuda.synchronize()
    expected = kernels.fused_moe.fused_moe_torch(hidden_states, gate_up, down, weights, ids)
    torch.testing.assert_close(graph_out, expected, **_tolerance(torch.bfloat16))


def test_launched_variants_compile_for_a_hopper_gpu(launched_kernel_variants):
    """Last in this module: its launches' variants compile for sm_90 (the interpreter accepts what the compiler may
    not; see ``kernel_variants``)."""
    compile_for_hopper(launched_kernel_variants)
