"""The fused rotary kernel (``hf_minivllm.kernels.rotary``) against its torch references and the layer's torch path.

Without a GPU the kernel runs under Triton's interpreter (tiny shapes, fp32/fp16: bf16 is unreliable there), which
must be switched on before triton's first import: this module sets ``TRITON_INTERPRET=1`` when it is imported
first, and otherwise ``test_interpreter_tests_in_a_fresh_process`` reruns it in a subprocess (as
``tests/test_kernels.py`` does). GPU-marked tests check bf16 at Qwen3's shape and the decoder on CUDA.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from conftest import import_kernel_module, run_under_interpreter
from kernel_variants import compile_for_hopper

# Each test records the kernel variants it launches under the interpreter; the last compiles them for a GPU.
pytestmark = pytest.mark.usefixtures("launched_kernel_variants")

CUDA = torch.cuda.is_available()

DEVICE = "cuda" if CUDA else "cpu"
MAX_POSITIONS = 512


@pytest.fixture(scope="module")
def rotary():
    """The kernel module, compiled on a GPU or interpreted on CPU."""
    return import_kernel_module("rotary")


def test_interpreter_tests_in_a_fresh_process():
    """Runs this file under the interpreter when this process cannot (see the module doc)."""
    run_under_interpreter(Path(__file__))


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3),
            torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}[dtype]


def _rotary_embedding(head_dim: int, dtype: torch.dtype, device: str = DEVICE):
    from hf_minivllm.layers.rotary import RotaryEmbedding

    inv_freq = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return RotaryEmbedding(head_dim, inv_freq, 1.0, MAX_POSITIONS, dtype).to(device)


class FusedQKVCase:
    """q and k as strided views into one fused ``[tokens, (Hq + 2 Hk) * D]`` projection output, as the model has."""

    def __init__(self, tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 seed: int = 0, split_heads: bool = False, device: str = DEVICE):
        generator = torch.Generator().manual_seed(seed)
        self.shape = (tokens, num_heads, num_kv_heads, head_dim)
        self.qkv = (torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=generator) * 3).to(dtype)
        self.qkv = self.qkv.to(device)
        self.positions = torch.randint(0, MAX_POSITIONS, (tokens,), generator=generator).to(device)
        self.q_weight = (1 + torch.randn(head_dim, generator=generator) * 0.3).to(dtype).to(device)
        self.k_weight = (1 + torch.randn(head_dim, generator=generator) * 0.3).to(dtype).to(device)
        self.split_heads = split_heads

    def views(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens, num_heads, num_kv_heads, head_dim = self.shape
        q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
        if self.split_heads:
            return q.view(tokens, num_heads, head_dim), k.view(tokens, num_kv_heads, head_dim), v
        return q, k, v

    def run(self, fn, *args) -> torch.Tensor:
        """A fresh copy of the fused output after ``fn(q, k, *args)`` rotated its q and k views in place."""
        qkv = self.qkv.clone()
        q, k, _ = self.views(qkv)
        fn(q, k, *args)
        return qkv


# ---------------------------------------------------------------- interpreter (or GPU) tests, tiny shapes


# Heads that are not a power of two (the kernel's half-head lanes span the next power of two, masked) add a few cases
# to the power-of-two grids, not a grid of their own: each interpreted case costs CI time.
@pytest.mark.parametrize("dtype, head_dim, heads, split_heads", [
    *itertools.product([torch.float32, torch.float16], [16, 64], [(4, 2), (24, 8)], [False, True]),
    (torch.float16, 96, (24, 8), False), (torch.float32, 24, (4, 2), True)], ids=str)
def test_rotary_matches_torch_bit_for_bit(rotary, dtype, head_dim, heads, split_heads):
    case = FusedQKVCase(9, *heads, head_dim, dtype, seed=head_dim + heads[0], split_heads=split_heads)
    cache = _rotary_embedding(head_dim, dtype).cos_sin_cache
    got = case.run(rotary.apply_rotary_inplace, case.positions, cache)
    expected = case.run(rotary.apply_rotary_inplace_torch, case.positions, cache)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)  # v (untouched) included
    # The reference is the layer's torch path.
    q, k, _ = case.views(case.qkv.cpu())
    layer_q, layer_k = _rotary_embedding(head_dim, dtype, device="cpu").forward(case.positions.cpu(), q, k)
    expected_q, expected_k, _ = case.views(expected.cpu())
    torch.testing.assert_close(layer_q, expected_q, atol=0, rtol=0)
    torch.testing.assert_close(layer_k, expected_k, atol=0, rtol=0)


@pytest.mark.parametrize("dtype, head_dim, heads", [
    *itertools.product([torch.float32, torch.float16], [16, 64], [(4, 2), (24, 8)]),
    (torch.float32, 80, (4, 2)), (torch.float16, 96, (24, 8))], ids=str)
def test_qk_norm_rotary_matches_torch(rotary, dtype, head_dim, heads):
    from hf_minivllm.layers.layernorm import RMSNorm

    case = FusedQKVCase(7, *heads, head_dim, dtype, seed=3 * head_dim + heads[0])
    cache = _rotary_embedding(head_dim, dtype).cos_sin_cache
    args = (case.q_weight, case.k_weight, 1e-6, case.positions, cache)
    got = case.run(rotary.qk_norm_rotary_inplace, *args)
    expected = case.run(rotary.qk_norm_rotary_inplace_torch, *args)
    # Only the sum of squares is reduced in another order; the rest rounds exactly like the reference.
    torch.testing.assert_close(got, expected, **_tolerance(dtype))
    # The reference is the layer's torch path with the decoder's RMSNorm modules (both on the CPU: CUDA's float32
    # norm rounds a few values differently).
    expected_q, expected_k, _ = case.views(case.qkv.cpu().clone())
    rotary.qk_norm_rotary_inplace_torch(expected_q, expected_k, *(a.cpu() if torch.is_tensor(a) else a for a in args))
    norms = []
    for weight in (case.q_weight, case.k_weight):
        norm = RMSNorm(head_dim, 1e-6).to(dtype)
        norm.weight.data.copy_(weight)
        norms.append(norm)
    q, k, _ = case.views(case.qkv.cpu())
    layer_q, layer_k = _rotary_embedding(head_dim, dtype, device="cpu").forward(case.positions.cpu(), q, k, *norms)
    torch.testing.assert_close(layer_q, expected_q, atol=0, rtol=0)
    torch.testing.assert_close(layer_k, expected_k, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else []))
@pytest.mark.parametrize("norm", [False, True], ids=["rope", "qk-norm+rope"])
@pytest.mark.parametrize("heads", [(4, 2, 16), (12, 12, 128), (4, 2, 96)],
                         ids=["one head block", "two, the last partial", "96-wide heads"])
def test_cache_write_stores_the_rotated_keys_as_the_store_kernel_does(rotary, dtype, norm, heads):
    """With a ``KVCacheWrite`` the launch also writes each token's rotated keys and its values to its slot (none
    for -1), byte for byte as the store does, and rotates q and k exactly as without one. At 128-wide heads a
    program takes 8 heads: 12 heads make a full block and a partial one for each of q, k and v. 96-wide heads span
    128 lanes, the last 32 masked: a store past the head would write the next head's or the next slot's bytes."""
    from hf_minivllm.kernels.kv_cache import KVCacheWrite

    (num_heads, num_kv_heads, head_dim), block_size = heads, 4
    case = FusedQKVCase(9, num_heads, num_kv_heads, head_dim, dtype, seed=5 + norm)
    cache = _rotary_embedding(head_dim, dtype).cos_sin_cache
    slots = torch.tensor([5, -1, 0, 17, 3, -1, 22, 8, 31], device=DEVICE)
    shape = (8, block_size, num_kv_heads, head_dim)

    def fresh_write() -> KVCacheWrite:
        generator = torch.Generator().manual_seed(1)
        return KVCacheWrite(*(torch.randn(shape, generator=generator).to(dtype).to(DEVICE) for _ in range(2)), slots)

    args = (case.q_weight, case.k_weight, 1e-6, case.positions, cache) if norm else (case.positions, cache)
    fused_kernel = rotary.qk_norm_rotary_inplace if norm else rotary.apply_rotary_inplace
    write, qkv = fresh_write(), case.qkv.clone()
    q, k, v = case.views(qkv)
    fused_kernel(q, k, *args, v=v, write=write)
    torch.testing.assert_close(qkv, case.run(fused_kernel, *args), atol=0, rtol=0)  # the rotation is unchanged
    expected = fresh_write()
    rotary.write_to_cache_torch(k, v, expected)  # the keys it rotated, stored by the reference store
    torch.testing.assert_close(write.k_cache, expected.k_cache, atol=0, rtol=0)
    torch.testing.assert_close(write.v_cache, expected.v_cache, atol=0, rtol=0)
    untouched = fresh_write()
    written = torch.zeros(shape[0] * block_size, dtype=torch.bool, device=DEVICE)
    written[slots[slots >= 0]] = True
    for got, before in ((write.k_cache, untouched.k_cache), (write.v_cache, untouched.v_cache)):
        rows, rows_before = got.view(-1, num_kv_heads * head_dim), before.view(-1, num_kv_heads * head_dim)
        assert torch.equal(rows[~written], rows_before[~written])
        assert not torch.equal(rows[written], rows_before[written])


def test_zero_tokens_and_invalid_inputs(rotary):
    cache = _rotary_embedding(16, torch.float32).cos_sin_cache
    empty = torch.empty(0, 3 * 16, device=DEVICE)
    rotary.apply_rotary_inplace(empty[:, :32], empty[:, 32:], torch.empty(0, dtype=torch.int64, device=DEVICE), cache)
    case = FusedQKVCase(3, 2, 1, 16, torch.float32)
    q, k, _ = case.views(case.qkv.clone())
    for head_dim in (12, 36, 512):  # too narrow, not a multiple of 8, too wide: the attention kernels' rule
        with pytest.raises(ValueError, match=f"multiple of 8 from 16 to 256, got head_dim {head_dim}"):
            rotary.apply_rotary_inplace(q, k, case.positions, torch.zeros(MAX_POSITIONS, head_dim, device=DEVICE))
    with pytest.raises(ValueError, match="agree in tokens and dtype"):
        rotary.apply_rotary_inplace(q, k, case.positions, cache.half())
    with pytest.raises(ValueError, match="agree in tokens and dtype"):
        rotary.apply_rotary_inplace(q, k, case.positions[:2], cache)
    with pytest.raises(ValueError, match="norm weights"):
        rotary.qk_norm_rotary_inplace(q, k, case.q_weight.half(), case.k_weight, 1e-6, case.positions, cache)
    from hf_minivllm.kernels.kv_cache import KVCacheWrite

    v = case.views(case.qkv.clone())[2]
    caches = [torch.zeros(4, 4, 1, 16, device=DEVICE) for _ in range(2)]
    slots = torch.arange(3, device=DEVICE)
    with pytest.raises(ValueError, match="given together"):
        rotary.apply_rotary_inplace(q, k, case.positions, cache, v=v)
    with pytest.raises(ValueError, match="one slot per token"):
        rotary.apply_rotary_inplace(q, k, case.positions, cache, v=v, write=KVCacheWrite(*caches, slots[:2]))
    with pytest.raises(ValueError, match="takes torch.float16 keys"):
        rotary.apply_rotary_inplace(q, k, case.positions, cache, v=v,
                                    write=KVCacheWrite(*(c.half() for c in caches), slots))
    fp8 = KVCacheWrite(*(c.to(torch.float8_e4m3fn) for c in caches), slots)
    with pytest.raises(ValueError, match="full-precision caches only"):
        rotary.apply_rotary_inplace(q, k, case.positions, cache, v=v, write=fp8)


@pytest.fixture
def kernel_path(monkeypatch):
    """Makes ``RotaryEmbedding`` take its Triton path on any device; returns the count of kernel calls."""
    from hf_minivllm.layers import rotary as rotary_layer

    calls = {"rotary": 0, "qk_norm_rotary": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(rotary_layer.RotaryEmbedding, "uses_kernel", lambda self, q: self.kernel_fits)
    monkeypatch.setattr(rotary_layer, "apply_rotary_inplace", counted("rotary", rotary_layer.apply_rotary_inplace))
    monkeypatch.setattr(rotary_layer, "qk_norm_rotary_inplace",
                        counted("qk_norm_rotary", rotary_layer.qk_norm_rotary_inplace))
    return calls


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decoder_on_the_kernel_path_matches_hf(rotary, kernel_path, family, backend, monkeypatch):
    """The layer and decoder wiring (in-place strided views, fused q/k norm) against HF, prefill chunks and decode.
    With the Triton attention backend the rotary launch also writes the keys and values to the cache, and the
    attention layer writes nothing itself."""
    from conftest import tiny_model
    from test_model import check_against_hf
    from hf_minivllm.layers import attention

    if CUDA:
        pytest.skip("forces the kernel on CPU tensors, which only the interpreter runs; the engine's GPU tests "
                    "cover the decoder on CUDA")
    stores = {"store_kvcache": 0, "store_kvcache_torch": 0}

    def counting(name: str, store):
        def counted(*args, **kwargs):
            stores[name] += 1
            return store(*args, **kwargs)
        return counted

    for name in stores:
        monkeypatch.setattr(attention, name, counting(name, getattr(attention, name)))
    check_against_hf(tiny_model(family), lengths=[7, 1, 13, 4], new_tokens=3, backend=backend)
    fused = "qk_norm_rotary" if family == "qwen3" else "rotary"
    assert kernel_path[fused] > 0 and sum(kernel_path.values()) == kernel_path[fused]
    if backend == "triton":  # the rotary launch wrote every key and value
        assert stores == {"store_kvcache": 0, "store_kvcache_torch": 0}
    else:
        assert stores["store_kvcache"] == 0 and stores["store_kvcache_torch"] > 0


# ---------------------------------------------------------------- GPU: bf16, real shapes, the decoder on CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("tokens", [1, 37, 1024])
def test_gpu_qwen3_shape_matches_torch(rotary, dtype, head_dim, tokens):
    case = FusedQKVCase(tokens, 16, 8, head_dim, dtype, seed=tokens + head_dim)
    cache = _rotary_embedding(head_dim, dtype).cos_sin_cache
    got = case.run(rotary.apply_rotary_inplace, case.positions, cache)
    expected = case.run(rotary.apply_rotary_inplace_torch, case.positions, cache)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    args = (case.q_weight, case.k_weight, 1e-6, case.positions, cache)
    got = case.run(rotary.qk_norm_rotary_inplace, *args)
    expected = case.run(rotary.qk_norm_rotary_inplace_torch, *args)
    torch.testing.assert_close(got, expected, **_tolerance(dtype))
    if dtype != torch.float32:  # another reduction order flips the rounding of a few normalised values, no more
        assert (got != expected).float().mean().item() < 0.02


@pytest.mark.gpu
def test_gpu_kernel_replays_in_cuda_graph(rotary):
    case = FusedQKVCase(8, 16, 8, 128, torch.bfloat16)
    cache = _rotary_embedding(128, torch.bfloat16).cos_sin_cache
    qkv, positions = case.qkv.clone(), case.positions.clone()
    q, k, _ = case.views(qkv)
    args = (case.q_weight, case.k_weight, 1e-6)
    rotary.qk_norm_rotary_inplace(q, k, *args, positions, cache)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rotary.qk_norm_rotary_inplace(q, k, *args, positions, cache)
    qkv.copy_(case.qkv)
    positions.copy_(torch.randint(0, MAX_POSITIONS, positions.shape, device=DEVICE))
    graph.replay()
    expected = case.qkv.clone()
    expected_q, expected_k, _ = case.views(expected)
    rotary.qk_norm_rotary_inplace(expected_q, expected_k, *args, positions, cache)
    torch.testing.assert_close(qkv, expected, atol=0, rtol=0)


def _prefill_logits(decoder, lengths: list[int], seed: int = 0) -> torch.Tensor:
    """Logits of one packed, uncached prefill of random sequences of the given lengths."""
    from hf_minivllm.layers.context import AttentionMetadata, set_attention_metadata

    device = decoder.device
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, decoder.vocab_size, (sum(lengths),), generator=generator).to(device)
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    set_attention_metadata(AttentionMetadata(
        is_prefill=True, slot_mapping=torch.full((sum(lengths),), -1, device=device),
        block_tables=torch.empty(0, 0, dtype=torch.int32, device=device), cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths)))
    try:
        with torch.inference_mode():
            return decoder.compute_logits(decoder(input_ids, positions)).float()
    finally:
        set_attention_metadata(None)


QWEN3_SHAPED = dict(hidden_size=256, intermediate_size=512, num_attention_heads=16, num_key_value_heads=8,
                    head_dim=128)
LLAMA_HEAD_DIM_64 = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.gpu
@pytest.mark.parametrize("family, overrides", [("qwen3", QWEN3_SHAPED), ("llama", LLAMA_HEAD_DIM_64),
                                               ("qwen3", {})])
def test_gpu_decoder_kernel_path_matches_torch_path_in_bf16(monkeypatch, family, overrides):
    """The same decoder with and without the kernel; against HF, test_model.py::test_cuda_matches_hf covers it."""
    from conftest import tiny_model
    from hf_minivllm.layers.rotary import RotaryEmbedding
    from hf_minivllm.models.adapter import build_decoder

    model = tiny_model(family, dtype=torch.bfloat16, **overrides).cuda()
    decoder = build_decoder(model)
    assert decoder.rotary_emb.uses_kernel(decoder.rotary_emb.cos_sin_cache)
    got = _prefill_logits(decoder, [1, 40, 300, 17])
    monkeypatch.setattr(RotaryEmbedding, "uses_kernel", lambda self, q: False)
    expected = _prefill_logits(decoder, [1, 40, 300, 17])
    monkeypatch.undo()
    assert (got - expected).norm() / expected.norm() < 1e-2
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.98


def test_launched_variants_compile_for_a_hopper_gpu(launched_kernel_variants):
    """Last in this module: its launches' variants compile for sm_90 (the interpreter accepts what the compiler may
    not; see ``kernel_variants``)."""
    compile_for_hopper(launched_kernel_variants)
