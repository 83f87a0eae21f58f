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


def test_a_drop_in_batch_switches_with_its_longest_row_as_hf_does():
    """HF picks the table per forward pass by the batch's longest row: in a left-padded batch a short row is rotated
    with the long table as soon as the longest row outgrows the original context (rows straddling it here; a
    crossing during generation as well)."""
    model = longrope_model()
    for short, long in ((10, 40), (12, 28)):
        rows = [prompt(short, 1), prompt(long, 2)]
        padded = {"input_ids": torch.zeros(2, long, dtype=torch.long), "attention_mask": torch.zeros(2, long,
                                                                                                     dtype=torch.long)}
        for index, tokens in enumerate(rows):
            padded["input_ids"][index, long - len(tokens):] = torch.tensor(tokens)
            padded["attention_mask"][index, long - len(tokens):] = 1
        settings = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
        expected = model.generate(**padded, use_cache=False, **settings)
        assert expected[0, long:].tolist() != hf_greedy(model, rows[0], 10)  # the batch changes the short row
        accelerated = hf_minivllm.accelerate(model, num_kvcache_blocks=64, kvcache_block_size=4)
        try:
            assert torch.equal(accelerated.generate(**padded, **settings), expected)
        finally:
            hf_minivllm.restore(model)


def test_hf_forwards_between_calls_do_not_rebuild_and_a_rebuild_mid_sequence_keeps_the_switch():
    """HF's module swaps its inv_freq buffer between the tables on every forward: not a weight change. A rebuild
    (new weight tensors) while a sequence runs past the switch recomputes it with the long table."""
    model = longrope_model()
    tokens = prompt(30, 3)
    expected = hf_greedy(model, tokens, 8)
    accelerated = hf_minivllm.accelerate(model, num_kvcache_blocks=64, kvcache_block_size=4)
    try:
        settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        for length in (8, 40, 8):
            with torch.no_grad():
                model(torch.tensor([prompt(length, 4)]))
            assert accelerated.generate(torch.tensor([tokens]), **settings)[0, 30:].tolist() == expected
        assert hf_minivllm.stats(model)["rebuilds"] == 0
    finally:
        hf_minivllm.restore(model)

    llm = LLM(copy.deepcopy(model), num_kvcache_blocks=64, kvcache_block_size=4)
    with llm:
        engine = llm.engine
        seq = engine.add_request(tokens, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        while len(seq) <= ORIGINAL:
            engine.step()
        engine.reload_model(llm._build_decoder())
        while engine.has_unfinished():
            engine.step()
        assert seq.completion_token_ids == expected


def test_longrope_on_other_architectures_stays_with_hf():
    """Only Phi-3's generate recomputes a sequence at the switch; Llama's keeps the keys it rotated with the short
    table, a cache the engine does not reproduce: that model keeps HF's generate."""
    scaling = {"rope_type": "longrope", "short_factor": [1.0] * HALF, "long_factor": [2.0] * HALF, "factor": 8.0,
               "original_max_position_embeddings": ORIGINAL}
    model = tiny_model("llama", rope_scaling=scaling, max_position_embeddings=256)
    with pytest.warns(UserWarning, match="longrope"):
        hf_minivllm.accelerate(model)
    assert "longrope" in hf_minivllm.stats(model)["unsupported_reason"]


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
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    # Built before any HF forward (transformers 4.x moves HF's short table to the GPU only in its first forward).
    with LLM(copy.deepcopy(model), gpu_memory_utilization=0.3, kvcache_block_size=16) as llm:
        assert llm.engine.runner.graphs is not None
        got = [out["token_ids"] for out in llm.generate(prompts, params, use_tqdm=False)]
    assert got == [hf_greedy(model, tokens, 20) for tokens in prompts]
