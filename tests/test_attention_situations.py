"""Attention over the paged KV cache in hard scheduling situations, against plain transformers (fp32 greedy, token
for token), and the choice of the attention backend for a model's heads and cache."""
from __future__ import annotations

import copy

import pytest
import torch

from hf_minivllm import LLM, SamplingParams
from hf_minivllm.engine import model_runner
from hf_minivllm.engine.model_runner import captures_cuda_graphs
from hf_minivllm.kernels.kv_cache import FP8_DTYPE
from hf_minivllm.layers import attention as attention_module
from hf_minivllm.layers.attention import select_attention_backend
from conftest import tiny_model

NEW_TOKENS = 10


def hf_greedy(model, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    """HF's greedy continuation of one prompt, eos not special (the engine runs with ``ignore_eos``)."""
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def engine_greedy(llm: LLM, prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    return [out["token_ids"] for out in llm.generate(prompts, params, use_tqdm=False)]


def window_prompts(block_size: int) -> list[list[int]]:
    """Prompts sharing a prefix of three blocks (longer than every tiny model's window, ending at a block boundary),
    then none, one, part of a block or a whole block of their own; and prompts of one token and of exactly two
    blocks."""
    generator = torch.Generator().manual_seed(7)
    prefix = torch.randint(3, 320, (3 * block_size,), generator=generator).tolist()
    own = [torch.randint(3, 320, (n,), generator=generator).tolist() for n in (0, 1, block_size - 1, block_size, 5)]
    alone = [torch.randint(3, 320, (n,), generator=generator).tolist() for n in (1, 2 * block_size)]
    return [prefix + tokens for tokens in own] + alone


WINDOWED = {"mistral": dict(sliding_window=6), "gemma2": {}, "gemma3": {}}


@pytest.mark.parametrize("family", sorted(WINDOWED))
def test_sliding_windows_across_chunks_prefix_hits_and_preemption_match_hf(family):
    """Windows of 6 or 8 keys over blocks of 4 (the window's edge inside a block), prompts prefilled 7 tokens at a
    time, a cached prefix longer than the window, and a cache of 10 blocks that preempts and recomputes."""
    model = tiny_model(family, **WINDOWED[family])
    prompts = window_prompts(4)
    expected = [hf_greedy(model, prompt) for prompt in prompts]
    llm = LLM(copy.deepcopy(model), kvcache_block_size=4, num_kvcache_blocks=10, max_num_seqs=4,
              max_num_batched_tokens=7, max_model_len=32)
    assert engine_greedy(llm, prompts) == expected
    assert engine_greedy(llm, prompts[::-1]) == expected[::-1], "every prompt again, its prefix read from the cache"
    assert llm.stats.preemptions > 0 and llm.stats.prefix_cache_hit_tokens >= 12


# ---------------------------------------------------------------- backend choice


def test_auto_backend_gives_heads_the_triton_kernels_cannot_take_to_torch(monkeypatch):
    """The Triton attention kernels take a head_dim that is a multiple of 8 from 16 to 256 (Phi-3-mini's 96, 80, 24
    included): other heads go to the torch backend (without flash-attn), and asking for triton says so before any
    work starts."""
    monkeypatch.setattr(attention_module, "_flash_attn", lambda: None)
    monkeypatch.setattr(attention_module, "_triton_available", lambda: True)
    for head_dim in (16, 24, 64, 80, 96, 128, 160, 256):
        assert select_attention_backend("auto", "cuda", head_dim=head_dim) == "triton"
        assert select_attention_backend("triton", "cuda", head_dim=head_dim) == "triton"
    for head_dim in (8, 12, 100, 512):
        assert select_attention_backend("auto", "cuda", head_dim=head_dim) == "torch"
        with pytest.raises(ValueError, match=f"multiple of 8 from 16 to 256, not head_dim {head_dim}"):
            select_attention_backend("triton", "cuda", head_dim=head_dim)


@pytest.mark.parametrize("kv_cache_dtype, dtype", [("auto", torch.float32), ("fp8", FP8_DTYPE)])
def test_runner_chooses_the_backend_for_its_block_size_cache_dtype_and_head_dim(monkeypatch, kv_cache_dtype, dtype):
    """``auto`` picks flash-attn only for a cache it can read (fp16/bf16; flash-attn 2: pages of 256) and triton only
    for heads its kernels take: the runner must say what its cache and heads are."""
    chosen = []

    def record(name, device, **cache):
        chosen.append(cache)
        return "torch"

    monkeypatch.setattr(model_runner, "select_attention_backend", record)
    model = tiny_model("llama", hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    LLM(model, kvcache_block_size=8, num_kvcache_blocks=16, max_model_len=64, kv_cache_dtype=kv_cache_dtype)
    assert chosen == [dict(block_size=8, dtype=dtype, head_dim=24)]


def test_torch_backend_runs_without_cuda_graphs():
    """The torch backend's KV store selects its rows and its prefill reads lengths on the host, which a graph
    capture forbids: on CUDA it runs eagerly."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert captures_cuda_graphs(cuda, "triton", enforce_eager=False)
    assert captures_cuda_graphs(cuda, "flash_attn", enforce_eager=False)
    assert not captures_cuda_graphs(cuda, "torch", enforce_eager=False)
    assert not captures_cuda_graphs(cuda, "triton", enforce_eager=True)
    assert not captures_cuda_graphs(cpu, "torch", enforce_eager=False)


def test_heads_that_are_not_a_power_of_two_are_served_token_exact():
    """A head_dim of 24 (Phi-3-mini's 96, scaled down) on the torch path (the CPU's); the Triton kernels' run of it
    is ``test_attention_layer.py``'s."""
    model = tiny_model("phi3", hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    prompts = window_prompts(4)[:4]
    llm = LLM(copy.deepcopy(model), kvcache_block_size=4, num_kvcache_blocks=64, max_model_len=64)
    assert engine_greedy(llm, prompts) == [hf_greedy(model, prompt) for prompt in prompts]
