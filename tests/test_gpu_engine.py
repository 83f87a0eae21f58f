"""The engine on CUDA: Triton kernels, CUDA-graph decode, KV sizing; HF is the oracle. Skipped without CUDA."""
import copy

import pytest
import torch

import hf_minivllm
from hf_minivllm import LLM, SamplingParams
from hf_minivllm.layers.context import AttentionMetadata, set_attention_metadata
from conftest import FAMILIES, tiny_model

pytestmark = pytest.mark.gpu


def left_padded(lengths, vocab=320, seed=0):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, vocab, (n,), generator=generator)
        mask[row, width - n :] = 1
    return ids.cuda(), mask.cuda()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_fp32_greedy_token_exact_on_cuda(family, enforce_eager):
    model = tiny_model(family).cuda()
    oracle = copy.deepcopy(model)
    hf_minivllm.accelerate(model, enforce_eager=enforce_eager, max_num_seqs=16, max_model_len=256)
    ids, mask = left_padded((30, 11, 22, 5, 17))
    expected = oracle.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    assert torch.equal(got, expected)
    assert hf_minivllm.stats(model)["fallbacks"] == 0


def test_backends_and_graphs_agree_in_bf16():
    model = tiny_model("qwen3", dtype=torch.bfloat16).cuda()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 320, (n,), generator=generator).tolist() for n in (40, 7, 100, 3, 64)]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    results = {}
    for backend, eager in (("triton", False), ("triton", True), ("torch", True)):
        llm = LLM(copy.deepcopy(model), attention_backend=backend, enforce_eager=eager, max_model_len=512,
                  max_num_seqs=8, gpu_memory_utilization=0.3)
        results[(backend, eager)] = [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]
        del llm  # an engine keeps its share of GPU memory until it is dropped
    reference = results[("torch", True)]
    for key, outputs in results.items():
        agree = sum(a == b for out, ref in zip(outputs, reference) for a, b in zip(out, ref))
        assert agree >= 0.9 * sum(map(len, reference)), key
    assert results[("triton", False)] == results[("triton", True)], "graph replay must equal eager"


def test_kv_cache_sized_from_gpu_memory_utilization_and_clear_error():
    small = LLM(tiny_model("llama").cuda(), gpu_memory_utilization=0.3, max_model_len=256)
    params = [SamplingParams(temperature=0.9, top_k=40, seed=1, max_tokens=20), SamplingParams(max_tokens=20)]
    small.generate([[5, 6, 7, 8]] * 2, params, use_tqdm=False)  # an engine that has run must be freed all the same
    small_blocks = small.engine.runner.num_blocks
    del small
    large = LLM(tiny_model("llama").cuda(), gpu_memory_utilization=0.5, max_model_len=256).engine.runner.num_blocks
    assert large > small_blocks > 0, "a dropped engine's memory must be available to the next one"
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        LLM(tiny_model("llama").cuda(), gpu_memory_utilization=0.0001, max_model_len=256)


def test_sampling_with_seeds_is_reproducible_on_cuda():
    llm = LLM(tiny_model("qwen2").cuda(), max_model_len=256, max_num_seqs=8)
    params = [SamplingParams(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, seed=s, max_tokens=20) for s in (1, 2)]
    prompts = [[5, 6, 7, 8]] * 2
    first = llm.generate(prompts, params, use_tqdm=False)
    second = llm.generate(prompts[::-1], params[::-1], use_tqdm=False)[::-1]
    assert first == second
    assert first[0] != first[1]


def test_bf16_qwen3_teacher_forced_top1_agreement():
    from workloads import random_model  # benchmarks/workloads.py

    model = random_model("0.6b")
    oracle = copy.deepcopy(model)
    llm = LLM(model, max_model_len=1024, enforce_eager=True, num_kvcache_blocks=1024 // 16)
    runner = llm.engine.runner
    generator = torch.Generator().manual_seed(3)
    total = agree = 0
    for length in (500, 500, 500, 500):
        tokens = torch.randint(0, 10000, (length,), generator=generator)
        with torch.no_grad():
            hf_top1 = oracle(tokens[None].cuda()).logits[0].argmax(-1)
        block = runner.block_size
        table = list(range((length + block - 1) // block))
        metadata = AttentionMetadata(
            is_prefill=True,
            slot_mapping=torch.arange(length, device="cuda"),
            block_tables=torch.tensor([table], dtype=torch.int32, device="cuda"),
            cu_seqlens_q=torch.tensor([0, length], dtype=torch.int32, device="cuda"),
            cu_seqlens_k=torch.tensor([0, length], dtype=torch.int32, device="cuda"),
            max_seqlen_q=length,
            max_seqlen_k=length,
        )
        set_attention_metadata(metadata)
        try:
            with torch.inference_mode():
                hidden = llm.model(tokens.cuda(), torch.arange(length, device="cuda"))
                ours_top1 = llm.model.compute_logits(hidden).argmax(-1)
        finally:
            set_attention_metadata(None)
        agree += int((ours_top1 == hf_top1).sum())
        total += length
    assert total == 2000 and agree / total >= 0.99, agree / total
