"""LongRoPE (Phi-3 long-context checkpoints): two rotary tables switched by sequence length, token-exact with HF.

HF rotates a forward pass with the long table when its longest position exceeds
``original_max_position_embeddings``, and Phi-3's generate recomputes the whole sequence when it first outgrows
that length (its cache holds keys rotated with the short table). The engine does the same per sequence: a prompt
past the original context is rotated with the long table throughout, and a sequence that crosses it while
generating is recomputed with it (as a preemption). The oracle is HF's generate without a KV cache, which runs the
whole sequence at every step: transformers 4.57's cached generate gives the same tokens, but 5.17's does not (its
recompute receives only the newest token, its cache having been dropped, so after the crossing it generates from
that one token alone).
"""
from __future__ import annotations

import copy

import pytest
import torch

import hf_minivllm
from conftest import tiny_model
from hf_minivllm import LLM, SamplingParams

ORIGINAL = 32  # original_max_position_embeddings: prompts and generations cross it
HALF = 8  # head_dim 16 / 2


def longrope_model():
    scaling = {"type": "longrope", "short_factor": [1.0 + 0.25 * i for i in range(HALF)],
               "long_factor": [3.0 + 2.0 * i for i in range(HALF)]}
    return tiny_model("phi3", rope_scaling=scaling, original_max_position_embeddings=ORIGINAL,
                      max_position_embeddings=256)


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_greedy(model, tokens: list[int], new_tokens: int) -> list[int]:
    """HF's own generate at batch 1 (the table switch is per forward pass, so per sequence here), without a cache
    (see the module docstring)."""
    out = model.generate(torch.tensor([tokens]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0, use_cache=False)
    return out[0, len(tokens):].tolist()


def test_a_sequence_outgrowing_the_original_context_is_recomputed_with_the_long_table():
    model = longrope_model()
    assert model.model.rotary_emb.rope_type == "longrope"
    short = hf_greedy(model, prompt(ORIGINAL, 0), 4)
    with LLM(copy.deepcopy(model), num_kvcache_blocks=64, kvcache_block_size=4) as llm:
        decoder = llm.model
        assert decoder.rope_long_after == ORIGINAL
        cache = decoder.rotary_emb.cos_sin_cache
        assert cache.shape[0] == 2 * 256 and not torch.equal(cache[:256], cache[256:])
        preemptions = llm.stats.preemptions
        assert llm.generate([prompt(ORIGINAL, 0)], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                            use_tqdm=False)[0]["token_ids"] == short
        assert llm.stats.preemptions == preemptions + 1  # the recompute at the crossing


def test_short_crossing_and_long_sequences_match_hf_with_chunks_and_prefix_cache():
    """Prompts below, at and above the original context, generations crossing it; prefill in chunks of 16
    tokens; then prompts sharing a cached prefix on either side of the switch."""
    model = longrope_model()
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompts = [prompt(10, 1), prompt(25, 2), prompt(ORIGINAL, 3), prompt(ORIGINAL + 1, 4), prompt(45, 5)]
    expected = [hf_greedy(model, tokens, 20) for tokens in prompts]
    with LLM(copy.deepcopy(model), num_kvcache_blocks=128, kvcache_block_size=4, max_num_batched_tokens=16) as llm:
        assert [out["token_ids"] for out in llm.generate(prompts, params, use_tqdm=False)] == expected

        base = prompt(20, 6)  # short, and stays short (8 new tokens); its blocks must not serve the long prompt
        longer = base + prompt(20, 7)
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        hits = []
        for tokens in (base, longer, base, longer):
            before = llm.stats.prefix_cache_hit_tokens
            assert llm.generate([tokens], params, use_tqdm=False)[0]["token_ids"] == hf_greedy(model, tokens, 8)
            hits.append(llm.stats.prefix_cache_hit_tokens - before)
        assert hits[1] == 0  # the short prompt's blocks were rotated with the other table
        assert hits[2] > 0 and hits[3] > 0  # each prompt hits its own blocks


def test_accelerated_generate_matches_hf():
    model = longrope_model()
    tokens = prompt(27, 8)
    expected = hf_greedy(model, tokens, 16)
    accelerated = hf_minivllm.accelerate(model, num_kvcache_blocks=64, kvcache_block_size=4)
    try:
        assert hf_minivllm.stats(accelerated)["unsupported_reason"] is None
        out = accelerated.generate(torch.tensor([tokens]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                   pad_token_id=0)
        assert out[0, len(tokens):].tolist() == expected
    finally:
        hf_minivllm.restore(model)


@pytest.mark.gpu
def test_on_the_gpu_with_graphs_and_async_scheduling():
    """The crossing happens while the step that sampled it is still in flight (async scheduling): the recompute
    waits for that token; decode steps run as CUDA graphs with the long table's rows."""
    model = longrope_model().cuda()
    prompts = [prompt(10, 1), prompt(25, 2), prompt(ORIGINAL, 3), prompt(45, 5)]
    expected = [hf_greedy(model, tokens, 20) for tokens in prompts]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    with LLM(model, gpu_memory_utilization=0.3, kvcache_block_size=16) as llm:
        assert llm.engine.runner.graphs is not None
        assert [out["token_ids"] for out in llm.generate(prompts, params, use_tqdm=False)] == expected
