"""The Attention layer end to end (store K/V, then prefill or decode) against naive dense attention, a model whose
heads the Triton kernels pad served on them through the engine, and backend selection."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

# First: test_kernels sets TRITON_INTERPRET on CPU machines, which must precede triton's first import.
from test_kernels import kernels, naive_attention  # noqa: F401, I001  (kernels: the fixture)

from hf_minivllm.layers import attention as attention_module  # noqa: I001
from hf_minivllm.layers.attention import Attention, select_attention_backend
from hf_minivllm.layers.context import AttentionMetadata, set_attention_metadata
from kernel_variants import compile_for_hopper  # noqa: I001

# Each test records the kernel variants it launches under the interpreter; the last compiles them for a GPU.
pytestmark = pytest.mark.usefixtures("launched_kernel_variants")

CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class Shape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int


TINY = Shape(num_heads=4, num_kv_heads=2, head_dim=16, block_size=4)  # the tiny test models' attention
QWEN3 = Shape(num_heads=16, num_kv_heads=8, head_dim=128, block_size=16)  # Qwen3-0.6B's, the engine's default pages
PHI3_MINI = Shape(num_heads=32, num_kv_heads=32, head_dim=96, block_size=16)  # a head the kernels pad to 128


class Sequences:
    """Several sequences growing step by step in one paged cache, with their dense K/V history for checking."""

    def __init__(self, num_seqs: int, shape: Shape = TINY, num_blocks: int = 64, dtype: torch.dtype = torch.float32,
                 device: str = "cpu"):
        self.shape = shape
        self.k_cache = torch.zeros(num_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim, dtype=dtype,
                                   device=device)
        self.v_cache = torch.zeros_like(self.k_cache)
        free = torch.randperm(num_blocks).tolist()
        self.pages = [free[i::num_seqs] for i in range(num_seqs)]
        self.keys = [torch.empty(0, shape.num_kv_heads, shape.head_dim) for _ in range(num_seqs)]
        self.values = [torch.empty(0, shape.num_kv_heads, shape.head_dim) for _ in range(num_seqs)]
        self.dtype, self.device = dtype, device

    def block_tables(self) -> torch.Tensor:
        width = max(math.ceil(len(k) / self.shape.block_size) for k in self.keys) + 1
        table = torch.full((len(self.keys), width), 1 << 30, dtype=torch.int32)
        for seq, keys in enumerate(self.keys):
            used = math.ceil(len(keys) / self.shape.block_size)
            table[seq, :used] = torch.tensor(self.pages[seq][:used], dtype=torch.int32)
        return table.to(self.device)

    def step(self, layer: Attention, new_tokens: list[int], is_prefill: bool, store: bool = True) -> None:
        """Run the layer on ``new_tokens[s]`` new tokens per sequence and check it against naive attention."""
        # Inputs rounded to the layer's dtype up front, so that the check measures the attention's own error.
        q, k, v = (torch.randn(sum(new_tokens), heads * self.shape.head_dim).to(self.dtype).float()
                   for heads in (self.shape.num_heads, self.shape.num_kv_heads, self.shape.num_kv_heads))
        prefix_lens = [len(keys) for keys in self.keys]
        start = 0
        for seq, count in enumerate(new_tokens):
            self.keys[seq] = torch.cat([self.keys[seq], k[start:start + count].view(-1, self.shape.num_kv_heads, self.shape.head_dim)])
            self.values[seq] = torch.cat([self.values[seq], v[start:start + count].view(-1, self.shape.num_kv_heads, self.shape.head_dim)])
            start += count
        slots = []
        for seq, (prefix_len, count) in enumerate(zip(prefix_lens, new_tokens)):
            for position in range(prefix_len, prefix_len + count):
                slots.append(self.pages[seq][position // self.shape.block_size] * self.shape.block_size + position % self.shape.block_size)
        context_lens = [len(keys) for keys in self.keys]
        to_device = dict(device=self.device)
        metadata = AttentionMetadata(
            is_prefill=is_prefill,
            slot_mapping=torch.tensor(slots, dtype=torch.int64, **to_device),
            block_tables=self.block_tables(),
            context_lens=None if is_prefill else torch.tensor(context_lens, dtype=torch.int32, **to_device),
            cu_seqlens_q=torch.tensor([0, *torch.tensor(new_tokens).cumsum(0).tolist()], dtype=torch.int32, **to_device),
            cu_seqlens_k=torch.tensor([0, *torch.tensor(context_lens).cumsum(0).tolist()], dtype=torch.int32, **to_device),
            max_seqlen_q=max(new_tokens),
            max_seqlen_k=max(context_lens),
        )
        if store:
            layer.k_cache, layer.v_cache = self.k_cache, self.v_cache
        set_attention_metadata(metadata)
        try:
            out = layer(*(t.to(self.dtype).to(self.device) for t in (q, k, v)))
        finally:
            set_attention_metadata(None)
        out = out.float().cpu().view(-1, self.shape.num_heads, self.shape.head_dim)
        start = 0
        for seq, (prefix_len, count) in enumerate(zip(prefix_lens, new_tokens)):
            positions = torch.arange(prefix_len, prefix_len + count)
            expected = naive_attention(q[start:start + count].view(-1, self.shape.num_heads, self.shape.head_dim), self.keys[seq],
                                       self.values[seq], positions, layer.scale, layer.sliding_window, layer.softcap)
            tolerance = 1e-5 if self.dtype == torch.float32 else 2e-2
            torch.testing.assert_close(out[start:start + count].double(), expected, atol=tolerance, rtol=tolerance)
            start += count


def _layer(backend: str = "torch", shape: Shape = TINY, **options) -> Attention:
    layer = Attention(shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.head_dim ** -0.5, **options)
    layer.backend = backend
    return layer


def test_prefill_then_prefix_prefill_then_decode_torch_backend():
    torch.manual_seed(0)
    sequences, layer = Sequences(3), _layer()
    sequences.step(layer, [5, 1, 9], is_prefill=True)
    sequences.step(layer, [3, 7, 2], is_prefill=True)  # chunked prefill / prefix-cache hit: queries after a prefix
    for _ in range(6):
        sequences.step(layer, [1, 1, 1], is_prefill=False)


def test_cached_keys_land_in_their_slots():
    torch.manual_seed(1)
    sequences, layer = Sequences(2), _layer()
    sequences.step(layer, [6, 3], is_prefill=True)
    for seq, keys in enumerate(sequences.keys):
        for position in range(len(keys)):
            page = sequences.pages[seq][position // TINY.block_size]
            torch.testing.assert_close(sequences.k_cache[page, position % TINY.block_size], keys[position].float())


def test_prefill_without_cache_attends_over_the_step_alone():
    """A warm-up/profiling pass before the runner assigns caches: causal attention over the new tokens only."""
    torch.manual_seed(2)
    sequences, layer = Sequences(2), _layer()
    sequences.step(layer, [7, 4], is_prefill=True, store=False)
    assert layer.k_cache.numel() == 0


def test_decode_without_cache_is_a_clear_error():
    layer = _layer()
    set_attention_metadata(AttentionMetadata(is_prefill=False, slot_mapping=torch.zeros(1, dtype=torch.int64),
                                             block_tables=torch.zeros(1, 1, dtype=torch.int32),
                                             context_lens=torch.ones(1, dtype=torch.int32)))
    try:
        with pytest.raises(RuntimeError, match="KV cache"):
            layer(torch.randn(1, TINY.num_heads * TINY.head_dim), *torch.randn(2, 1, TINY.num_kv_heads * TINY.head_dim))
    finally:
        set_attention_metadata(None)


# Windows shorter than a page (3), spanning pages (6) and longer than every context (100); a soft-cap that bites
# (scores of these random inputs reach about 3).
WINDOWED = [dict(sliding_window=3, softcap=1.5), dict(sliding_window=6), dict(sliding_window=100, softcap=1.5)]


@pytest.mark.parametrize("options", WINDOWED, ids=str)
def test_window_and_softcap_torch_backend(options):
    """Prefill, a prefix prefill (chunked prefill) and decode far past the window, against dense attention."""
    torch.manual_seed(5)
    sequences, layer = Sequences(3), _layer(**options)
    sequences.step(layer, [9, 1, 13], is_prefill=True)
    sequences.step(layer, [3, 7, 2], is_prefill=True)
    for _ in range(6):
        sequences.step(layer, [1, 1, 1], is_prefill=False)
    Sequences(2).step(_layer(**options), [7, 4], is_prefill=True, store=False)


@pytest.mark.parametrize("options", WINDOWED, ids=str)
def test_window_and_softcap_triton_backend_under_interpreter(kernels, options):  # noqa: F811
    if CUDA:
        pytest.skip("covered by test_gpu_layer_backends_match_naive")
    torch.manual_seed(6)
    sequences, layer = Sequences(2), _layer("triton", **options)
    sequences.step(layer, [9, 13], is_prefill=True)
    sequences.step(layer, [3, 2], is_prefill=True)
    for _ in range(3):
        sequences.step(layer, [1, 1], is_prefill=False)
    Sequences(2).step(_layer("triton", **options), [7, 4], is_prefill=True, store=False)


@pytest.mark.parametrize("version", [2, 4])
def test_flash_attn_gets_the_window_and_softcap(monkeypatch, version):
    """flash-attn is not installed here: a stand-in records the calls. A window w is ``window_size=(w - 1, 0)``
    (keys ``[i - w + 1, i]``, causal), the soft-cap is ``softcap``; a plain layer passes neither."""
    calls = []

    def record(q, *args, **kwargs):
        calls.append(kwargs)
        return torch.zeros_like(q)

    flash = SimpleNamespace(version=version, varlen=record, with_kvcache=record)
    monkeypatch.setattr(attention_module, "_flash_attn", lambda: flash)
    # The cache is on the CPU here, where the Triton store only runs interpreted: the torch store stands in.
    monkeypatch.setattr(attention_module, "store_kvcache", attention_module.store_kvcache_torch)
    q, k, v = torch.zeros(2, 4, 16), torch.zeros(2, 2, 16), torch.zeros(2, 2, 16)
    cu_seqlens, table = torch.tensor([0, 2], dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32)
    for options, expected in [(dict(sliding_window=8, softcap=50.0), dict(window_size=(7, 0), softcap=50.0)),
                              (dict(sliding_window=1), dict(window_size=(0, 0))), ({}, {})]:
        layer = _layer("flash_attn", **options)
        calls.clear()
        for is_prefill, has_cache in [(True, False), (True, True), (False, True)]:
            layer.k_cache, layer.v_cache = (torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 2, 16)) if has_cache else (
                torch.tensor([]), torch.tensor([]))
            set_attention_metadata(AttentionMetadata(
                is_prefill=is_prefill, slot_mapping=torch.tensor([0, 1] if is_prefill else [1]), block_tables=table,
                context_lens=None if is_prefill else torch.tensor([2], dtype=torch.int32), cu_seqlens_q=cu_seqlens,
                cu_seqlens_k=cu_seqlens, max_seqlen_q=2, max_seqlen_k=2))
            try:
                rows = 2 if is_prefill else 1
                layer(q[:rows].reshape(rows, -1), k[:rows].reshape(rows, -1), v[:rows].reshape(rows, -1))
            finally:
                set_attention_metadata(None)
        assert len(calls) == 3
        for call in calls:
            assert call["causal"] is True
            assert {name: call[name] for name in ("window_size", "softcap") if name in call} == expected


def test_triton_backend_under_interpreter(kernels):  # noqa: F811
    """The layer's Triton path (store, prefix prefill, split decode, and the no-cache prefill) on CPU tensors."""
    if CUDA:
        pytest.skip("covered by test_gpu_layer_backends_match_torch")
    torch.manual_seed(3)
    sequences, layer = Sequences(2), _layer("triton")
    sequences.step(layer, [5, 9], is_prefill=True)
    sequences.step(layer, [3, 2], is_prefill=True)
    sequences.step(layer, [1, 1], is_prefill=False)
    Sequences(2).step(_layer("triton"), [6, 3], is_prefill=True, store=False)


def test_heads_of_24_through_the_engine_on_the_triton_kernels(kernels, monkeypatch):  # noqa: F811
    """A model whose heads are 24 wide (Phi-3-mini's 96, scaled down; the kernels' tiles span 32) served on the
    Triton kernels, interpreted, through the whole engine: the store, prefills with prefix-cache hits, decode and
    (its thresholds lowered) cascade decode over the prompts' shared prefix. Greedy tokens equal HF's."""
    if CUDA:
        pytest.skip("compiled kernels take no CPU tensors: test_gpu_layer_backends_match_naive[phi3_mini] runs them")
    from conftest import tiny_model
    from hf_minivllm import LLM
    from hf_minivllm.engine import model_runner
    from test_attention_situations import engine_greedy, hf_greedy, window_prompts

    monkeypatch.setattr(model_runner, "select_attention_backend", lambda name, device, **cache: "triton")
    monkeypatch.setattr(model_runner, "CASCADE_MIN_SEQS", 4)
    monkeypatch.setattr(model_runner, "CASCADE_MIN_PREFIX_TOKENS", 8)
    cascades = []
    cascade = attention_module.cascade_decode_attention

    def counted_cascade(*args, **kwargs) -> torch.Tensor:
        cascades.append(args[0].shape)
        return cascade(*args, **kwargs)

    monkeypatch.setattr(attention_module, "cascade_decode_attention", counted_cascade)
    model = tiny_model("phi3", hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    assert model.config.hidden_size // model.config.num_attention_heads == 24
    prompts = window_prompts(4)[:4]
    llm = LLM(copy.deepcopy(model), kvcache_block_size=4, num_kvcache_blocks=64, max_model_len=64, max_num_seqs=4)
    assert llm.engine.runner.attention_backend == "triton"
    new_tokens = 6  # each decode step is a few interpreted launches per layer
    assert engine_greedy(llm, prompts, new_tokens) == [hf_greedy(model, prompt, new_tokens) for prompt in prompts]
    assert cascades and llm.stats.prefix_cache_hit_tokens > 0


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [QWEN3, PHI3_MINI], ids=["qwen3", "phi3_mini"])
@pytest.mark.parametrize("backend", ["triton", "flash_attn"])
def test_gpu_layer_backends_match_naive(backend, shape):
    try:
        select_attention_backend(backend, "cuda", block_size=shape.block_size, dtype=torch.bfloat16,
                                 head_dim=shape.head_dim)
    except ValueError as error:
        pytest.skip(str(error))
    torch.manual_seed(4)
    gpu = dict(shape=shape, dtype=torch.bfloat16, device="cuda")
    sequences, layer = Sequences(3, num_blocks=64, **gpu), _layer(backend, shape)
    sequences.step(layer, [50, 1, 90], is_prefill=True)
    sequences.step(layer, [30, 7, 2], is_prefill=True)
    for _ in range(3):
        sequences.step(layer, [1, 1, 1], is_prefill=False)
    Sequences(2, **gpu).step(_layer(backend, shape), [60, 30], is_prefill=True, store=False)


# ---------------------------------------------------------------- backend selection


def test_auto_is_torch_on_cpu():
    assert select_attention_backend("auto", "cpu") == "torch"
    assert select_attention_backend("torch", "cpu") == "torch"


@pytest.mark.parametrize("name", ["triton", "flash_attn"])
def test_gpu_backends_on_cpu_are_a_clear_error(name):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        select_attention_backend(name, torch.device("cpu"))


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown attention backend"):
        select_attention_backend("xformers", "cpu")


def test_flash_attn_selection_follows_what_imports(monkeypatch):
    monkeypatch.setattr(attention_module, "_flash_attn", lambda: None)
    assert select_attention_backend("auto", "cuda") == "triton"
    with pytest.raises(ValueError, match="does not import"):
        select_attention_backend("flash_attn", "cuda")

    monkeypatch.setattr(attention_module, "_flash_attn", lambda: SimpleNamespace(version=4))
    assert select_attention_backend("auto", "cuda", block_size=16, dtype=torch.bfloat16) == "flash_attn"
    assert select_attention_backend("auto", "cuda", dtype=torch.float32) == "triton"
    with pytest.raises(ValueError, match="fp16/bf16"):
        select_attention_backend("flash_attn", "cuda", dtype=torch.float32)

    monkeypatch.setattr(attention_module, "_flash_attn", lambda: SimpleNamespace(version=2))
    assert select_attention_backend("auto", "cuda", block_size=16) == "triton"
    assert select_attention_backend("auto", "cuda", block_size=256) == "flash_attn"
    with pytest.raises(ValueError, match="multiple of 256"):
        select_attention_backend("flash_attn", "cuda", block_size=16)


def test_layer_defaults():
    layer = Attention(8, 2, 64, 0.125)
    assert layer.backend == "torch" and layer.k_cache.numel() == 0 and layer.v_cache.numel() == 0
    assert layer.sliding_window is None and layer.softcap is None
    with pytest.raises(ValueError, match="multiple"):
        Attention(6, 4, 64, 0.125)
    with pytest.raises(ValueError, match="sliding_window"):
        Attention(8, 2, 64, 0.125, sliding_window=0)
    with pytest.raises(ValueError, match="softcap"):
        Attention(8, 2, 64, 0.125, softcap=0.0)
    assert "sliding_window=4, softcap=30.0" in repr(Attention(8, 2, 64, 0.125, sliding_window=4, softcap=30.0))


def test_torch_decode_ignores_nan_garbage_past_the_context():
    """Cache memory is never cleared: slots past a sequence's context may hold NaN and must not leak in."""
    from hf_minivllm.kernels.decode_attention import paged_decode_attention_torch

    generator = torch.Generator().manual_seed(0)
    k_cache = torch.full((4, 4, 2, 16), float("nan"))
    v_cache = torch.full((4, 4, 2, 16), float("nan"))
    k_cache[1, :3] = torch.randn(3, 2, 16, generator=generator)
    v_cache[1, :3] = torch.randn(3, 2, 16, generator=generator)
    q = torch.randn(1, 4, 16, generator=generator)
    out = paged_decode_attention_torch(q, k_cache, v_cache, torch.tensor([3], dtype=torch.int32),
                                       torch.tensor([[1, 2]], dtype=torch.int32), 0.25)
    assert torch.isfinite(out).all()


def test_launched_variants_compile_for_a_hopper_gpu(launched_kernel_variants):
    """Last in this module: its launches' variants compile for sm_90 (the interpreter accepts what the compiler may
    not; see ``kernel_variants``)."""
    compile_for_hopper(launched_kernel_variants)
