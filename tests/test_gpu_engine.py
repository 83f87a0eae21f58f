"""The engine on CUDA: Triton kernels, CUDA-graph decode, KV sizing; HF is the oracle. Skipped without CUDA."""
import contextlib
import copy
import gc
import threading

import pytest
import torch

import hf_minivllm
from hf_minivllm import LLM, SamplingParams
from conftest import FAMILIES, shared_prefix_prompts, tiny_model

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


def test_fp32_greedy_token_exact_on_cuda_with_requests_queued_behind_a_small_batch():
    """More rows than max_num_seqs: later rows are prefilled while decode steps are in flight (async scheduling)."""
    model = tiny_model("qwen3").cuda()
    oracle = copy.deepcopy(model)
    hf_minivllm.accelerate(model, max_num_seqs=2, max_model_len=256)
    ids, mask = left_padded((30, 11, 22, 5, 17))
    expected = oracle.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    assert torch.equal(got, expected)
    assert model._hf_minivllm.llm.engine.runner.prefill_graphs.replays > 0, "prompts ran through prefill graphs"


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "qwen3_moe"])
def test_fp32_greedy_token_exact_on_cuda_with_prefill_graphs_and_eager_prefills(family):
    """Prompts that fit a prefill graph (alone, or several beside running requests) and prompts that do not (over
    max_prefill_graph_tokens) give HF's tokens; a cached prefix too."""
    if family not in FAMILIES:
        pytest.skip(f"{family} is not served with this transformers version")
    model = tiny_model(family).cuda()
    generator = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 320, (n,), generator=generator).tolist() for n in (5, 70, 200, 33, 140, 9, 60)]
    prompts.append(prompts[2][:150] + [11, 12])  # a prefix-cache hit
    llm = LLM(copy.deepcopy(model), max_num_seqs=3, max_model_len=512, max_prefill_graph_tokens=128,
              gpu_memory_utilization=0.3)
    params = SamplingParams(temperature=0, max_tokens=24, min_tokens=24)  # as HF's min_new_tokens: eos banned
    got = [out["token_ids"] for out in llm.generate(prompts, params, use_tqdm=False)]
    for prompt, tokens in zip(prompts, got):
        ids = torch.tensor([prompt], device="cuda")
        expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                  do_sample=False, min_new_tokens=24)
        assert tokens == expected[0, len(prompt):].tolist()
    runner = llm.engine.runner
    assert runner.prefill_graphs is not None and runner.prefill_graphs.replays > 0
    assert hf_minivllm.stats(llm)["prefix_cache_hit_tokens"] > 0


@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_fp8_kv_cache_on_cuda_agrees_with_the_full_precision_cache(family):
    """The Triton kernels on an FP8 cache: teacher-forced top-1 agreement of prefills (prefill graphs) with the fp32
    cache as on the CPU's torch path (tiny random models: flat distributions, hence 90%), and decode steps (decode
    graphs) reading the FP8 cache as those prefills do."""
    from test_fp8_kv_cache import teacher_forced_agreement

    model = tiny_model(family).cuda()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 320, (n,), generator=generator).tolist() for n in (5, 30, 60, 17, 90, 44)]
    settings = dict(max_model_len=256, max_num_seqs=64, kv_cache_memory_gib=0.5)  # two engines in one process
    reference = LLM(copy.deepcopy(model), **settings)
    fp8 = LLM(model, kv_cache_dtype="fp8", **settings)
    assert fp8.engine.runner.kv_cache.dtype == torch.float8_e4m3fn and fp8.engine.runner.attention_backend == "triton"
    fp8_agreement, own_agreement = teacher_forced_agreement(reference, fp8, prompts, 24)
    assert own_agreement == 1.0 and fp8_agreement >= 0.9, (fp8_agreement, own_agreement)
    _, decode_agreement = teacher_forced_agreement(fp8, fp8, prompts, 24)
    assert decode_agreement >= 0.99, decode_agreement
    assert fp8.engine.runner.prefill_graphs.replays > 0


@pytest.mark.parametrize("family, kv_cache_dtype", [("qwen3", "auto"), ("qwen3_moe", "auto"), ("qwen3", "fp8")])
def test_no_triton_kernel_compiles_after_start_up(family, kv_cache_dtype):
    """The engine's warm-up and graph capture compile every kernel a run needs: a compile on a request's first step
    would stall it for seconds. Prompt lengths that change the prefill's block-table width (and the MoE's pairs per
    expert), a prefix-cache hit, and greedy, temperature-only and top-k rows must all run on what start-up
    compiled."""
    from triton import knobs

    model = tiny_model(family, dtype=torch.bfloat16).cuda()
    llm = LLM(model, max_model_len=512, max_num_seqs=8, gpu_memory_utilization=0.3, kv_cache_dtype=kv_cache_dtype)
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 320, (n,), generator=generator).tolist() for n in (37, 3, 260, 17, 130)]
    params = [SamplingParams(temperature=t, top_k=k, max_tokens=20, ignore_eos=True)
              for t, k in ((0.6, -1), (0, -1), (0.6, -1), (1.0, 5), (0, -1))]
    compiled = []
    knobs.runtime.jit_cache_hook = lambda **details: compiled.append(details.get("repr", "?").split("(")[0])
    try:
        llm.generate(prompts, params, use_tqdm=False)
        llm.generate([prompts[2] + [5, 6, 7]], params[:1], use_tqdm=False)  # a cached prefix
    finally:
        knobs.runtime.jit_cache_hook = None
    assert hf_minivllm.stats(llm)["prefix_cache_hit_tokens"] > 0
    assert compiled == []


@pytest.mark.parametrize("family, layers, kv_cache_dtype, cascade", [
    ("qwen3", dict(num_hidden_layers=4), "auto", False),
    ("qwen3", dict(num_hidden_layers=4), "fp8", False),
    ("qwen3", dict(num_hidden_layers=4), "auto", True),
    ("qwen3_moe", dict(num_hidden_layers=5, mlp_only_layers=[0, 1, 3]), "auto", False),
    ("gemma3", dict(num_hidden_layers=6, layer_types=["sliding_attention"] * 3 + ["full_attention",
                                                                                 "sliding_attention", "full_attention"]),
     "auto", False)])
def test_start_up_compiles_every_variant_in_its_compile_passes(family, layers, kv_cache_dtype, cascade):
    """The compile passes, and the warm-ups before graph captures, run only the model's variant layers. Every variant
    that the warm-up, the graph captures (the cascade's too, captured at its first step) and the first requests
    launch must have come from the passes: one left to a capture's warm-up would fail it (a kernel module may not be
    loaded while a stream captures)."""
    import importlib
    import pkgutil

    import triton
    from triton import knobs

    import hf_minivllm.kernels
    from hf_minivllm.kernels import launch

    for module in pkgutil.iter_modules(hf_minivllm.kernels.__path__):  # forget the variants earlier tests loaded
        for value in vars(importlib.import_module(f"hf_minivllm.kernels.{module.name}")).values():
            if isinstance(value, triton.runtime.JITFunction):
                value.device_caches.clear()
    model = tiny_model(family, dtype=torch.bfloat16, seed=7, **layers).cuda()
    outside = []

    def record(**details):
        if launch._SUBMITTED.get() is None:  # not a compile pass's
            outside.append(details.get("repr", "?").split("(")[0])

    knobs.runtime.jit_cache_hook = record
    try:
        if cascade:  # 40 sequences sharing 600 tokens decode in cascade steps (see CASCADE_MIN_*)
            llm = LLM(model, max_model_len=1024, max_num_seqs=64, gpu_memory_utilization=0.3)
            prompts = shared_prefix_prompts(40, 600, seed=5, max_own=30)
        else:
            llm = LLM(model, max_model_len=512, max_num_seqs=8, gpu_memory_utilization=0.3,
                      kv_cache_dtype=kv_cache_dtype)
            prompts = [[5] * 40, [7] * 3]
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    finally:
        knobs.runtime.jit_cache_hook = None
    assert outside == []
    if cascade:
        captured = llm.engine.runner.graphs.cascade_graphs
        assert captured and all(graph is not None for graph in captured.values())


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3"])
def test_cascade_attention_on_cuda_gives_the_plain_tokens_in_fp32(family):
    """40 requests sharing a 600-token prefix (prefix caching shares its pages) decode through cascade graphs,
    captured at their first step from kernels start-up compiled, token-exact with cascade attention off. Gemma 2
    and 3: sliding-window layers (which keep the plain kernel) between the global ones; Gemma 2's logit softcap."""
    from triton import knobs

    model = tiny_model(family).cuda()
    prompts = shared_prefix_prompts(40, 600, seed=5, max_own=30)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    engine = dict(max_num_seqs=64, max_model_len=1024, gpu_memory_utilization=0.3)
    plain = LLM(copy.deepcopy(model), cascade_attention=False, **engine)
    expected = [out["token_ids"] for out in plain.generate(prompts, params, use_tqdm=False)]
    plain.close()
    llm = LLM(model, cascade_attention=True, **engine)
    graphs, shared = llm.engine.runner.graphs, []
    run = graphs.run

    def spy(inputs, shared_prefix_len=0):
        shared.append(shared_prefix_len)
        return run(inputs, shared_prefix_len)

    graphs.run = spy
    compiled = []
    knobs.runtime.jit_cache_hook = lambda **details: compiled.append(details.get("repr", "?").split("(")[0])
    try:
        got = [out["token_ids"] for out in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        knobs.runtime.jit_cache_hook = None
    assert got == expected
    assert max(shared) >= 512 and graphs.cascade_graphs, shared
    assert compiled == []


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


@pytest.mark.parametrize("max_num_seqs", [512, 256])
def test_memory_in_use_stays_within_the_budget(max_num_seqs):
    """gpu_memory_utilization bounds what the device holds once the engine has run its largest steps: full prefill
    batches, then top-p sampling (the whole-vocabulary sort) with logprobs at a full batch."""
    from workloads import random_model, w1_requests

    gc.collect()
    torch.cuda.empty_cache()
    utilization = 0.5
    prompts, params = w1_requests(256, 1024, 128)
    llm = LLM(random_model("0.6b"), gpu_memory_utilization=utilization, max_model_len=4096,
              max_num_seqs=max_num_seqs)
    llm.generate(prompts, params, use_tqdm=False)
    top_p = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=32, logprobs=5)
    llm.generate(prompts, [top_p] * len(prompts), use_tqdm=False)
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    assert total - free <= total * utilization, ((total - free) / GIB, total * utilization / GIB)


def test_sampling_with_seeds_is_reproducible_on_cuda():
    llm = LLM(tiny_model("qwen2").cuda(), max_model_len=256, max_num_seqs=8)
    params = [SamplingParams(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, seed=s, max_tokens=20) for s in (1, 2)]
    prompts = [[5, 6, 7, 8]] * 2
    first = llm.generate(prompts, params, use_tqdm=False)
    second = llm.generate(prompts[::-1], params[::-1], use_tqdm=False)[::-1]
    assert first == second
    assert first[0] != first[1]


def test_bf16_qwen3_teacher_forced_top1_agreement_at_hf_noise_floor():
    """Teacher-forced top-1 over 2,000 positions, bf16 Qwen3-0.6B architecture (random init).

    A random model's logits are nearly flat, so bf16 rounding alone flips some top-1s: HF's own eager and sdpa
    attention agree on about 96% of positions, and HF bf16 agrees with HF fp32 on about as many. Our engine must sit
    at that noise floor: as close to HF bf16, and to the fp32 reference, as HF's other bf16 path is.
    """
    from bf16_agreement import sample_texts, teacher_forced_top1  # benchmarks/bf16_agreement.py
    from workloads import random_model

    table, _ = teacher_forced_top1(random_model("0.6b"), sample_texts(None), backends=("triton",))
    assert table["hf_bf16 vs ours_triton"] >= table["hf_bf16 vs hf_bf16_eager"] - 0.01, table
    assert table["hf_fp32 vs ours_triton"] >= table["hf_bf16 vs hf_fp32"] - 0.01, table


def test_bf16_qwen3_teacher_forced_top1_agreement_on_trained_weights():
    """At least 99% over 2,000 positions once the weights are trained: the Qwen3-0.6B architecture trained for 400
    steps (about 100 s on an H100) as a byte-level LM on the standard library's sources, scored on held-out files.
    The FP8 KV cache agrees with our bf16 cache on at least 98%."""
    from bf16_agreement import sample_texts, stdlib_bytes, teacher_forced_top1, train_byte_lm
    from workloads import random_model

    gc.collect()  # engines of earlier tests give their KV caches back before training needs the memory
    torch.cuda.empty_cache()
    model = train_byte_lm(random_model("0.6b"), steps=400)
    texts = sample_texts(stdlib_bytes(held_out=True))
    assert sum(map(len, texts)) == 2000
    table, _ = teacher_forced_top1(model, texts, backends=("triton",), fp8_kv_cache=True)
    assert table["hf_bf16 vs ours_triton"] >= 0.99, table
    assert table["ours_triton vs ours_triton_fp8"] >= 0.98, table  # the FP8 KV cache against the bf16 one


GIB = 1 << 30


def _device_free() -> int:
    """Bytes the rest of the program can have: free on the device plus what PyTorch's allocator caches unused."""
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


def _record_growth(runner):
    """The number of KV blocks after each growth of ``runner``'s storage."""
    sizes, grow = [], runner.storage.grow

    def spy(*args):
        sizes.append(grow(*args))
        return sizes[-1]

    runner.storage.grow = spy
    return sizes


def test_on_demand_kv_cache_grows_gives_memory_back_and_keeps_its_graphs():
    """accelerate's cache: a small floor after start-up, grown for a large batch (the virtual address never moves,
    so the decode graphs captured at start-up stay valid), given back to the device when the call returns."""
    from hf_minivllm.engine.kv_storage import VirtualKVStorage
    from workloads import random_model

    gc.collect()
    torch.cuda.empty_cache()
    model = random_model("0.6b")
    before = _device_free()
    # No prefix caching: the second call must recompute exactly what the first did (bf16 numerics of a prefill
    # that starts after cached blocks differ slightly), so any difference would come from the graphs or the cache.
    hf_minivllm.accelerate(model, max_model_len=2048, enable_prefix_caching=False)
    runner = model._hf_minivllm.llm.engine.runner
    assert isinstance(runner.storage, VirtualKVStorage) and runner.graphs is not None
    idle = _device_free()
    assert before - idle < 2 * GIB, f"accelerate took {(before - idle) / GIB:.2f} GiB before any call"
    sizes = _record_growth(runner)
    ids, mask = left_padded([200 + 7 * i for i in range(96)], vocab=150000, seed=3)
    kwargs = dict(max_new_tokens=300, min_new_tokens=300, do_sample=False)
    first = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert max(sizes) * runner.kv_bytes_per_block > 4 * GIB, "grown for the whole batch"
    assert abs(_device_free() - idle) < 0.1 * GIB, "memory above the floor handed back when the call returned"
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **kwargs), first)
    assert hf_minivllm.stats(model)["fallbacks"] == 0
    resident = LLM(model, kv_cache_resident=True, gpu_memory_utilization=0.5, max_model_len=2048)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]
    outputs = resident.generate(prompts, SamplingParams(temperature=0, max_tokens=300, ignore_eos=True), use_tqdm=False)
    assert [o["token_ids"] for o in outputs] == first[:, ids.shape[1]:].tolist()
    resident.close()


class _StopAfter:
    """A stopping criterion ending every row after ``steps`` tokens (the engine sized its cache for max_new_tokens)."""

    def __init__(self, steps):
        self.steps, self.calls = steps, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        return torch.full((input_ids.shape[0],), self.calls >= self.steps, dtype=torch.bool, device=input_ids.device)


def test_two_accelerated_models_take_turns_with_most_of_the_gpu_and_training_fits_afterwards():
    from transformers import StoppingCriteriaList
    from workloads import random_model

    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.mem_get_info()[1]
    models = [hf_minivllm.accelerate(random_model("0.6b", seed=seed), max_model_len=4096) for seed in (0, 1)]
    ids, mask = left_padded([500] * 256, vocab=150000, seed=4)
    for model in models + models:
        sizes = _record_growth(model._hf_minivllm.llm.engine.runner)
        criteria = StoppingCriteriaList([_StopAfter(3)])
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3500, do_sample=False,
                       stopping_criteria=criteria)
        runner = model._hf_minivllm.llm.engine.runner
        assert max(sizes) * runner.kv_bytes_per_block > 0.5 * total, "each model may use most of the GPU in turn"
    trained = models[0]
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-4)
    trained.train()
    batch = torch.randint(0, 150000, (16, 1024), device="cuda")
    trained(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    trained.eval()
    out = trained.generate(input_ids=ids[:4], attention_mask=mask[:4], max_new_tokens=8, do_sample=False)
    assert hf_minivllm.stats(trained)["weight_updates"] == 1 and out.shape[1] == ids.shape[1] + 8


def test_threads_on_cuda_get_their_solo_answers():
    from concurrent.futures import ThreadPoolExecutor

    model = hf_minivllm.accelerate(tiny_model("qwen3").cuda(), max_model_len=512)
    calls = [left_padded([10 + i, 3 + 2 * i][: 1 + i % 2], seed=i) for i in range(16)]
    kwargs = dict(max_new_tokens=40, do_sample=False)
    solo = [model.generate(input_ids=ids, attention_mask=mask, **kwargs) for ids, mask in calls]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda c: model.generate(input_ids=c[0], attention_mask=c[1], **kwargs), calls))
    assert all(torch.equal(a, b) for a, b in zip(solo, together))
    assert torch.equal(model.generate(input_ids=calls[0][0], attention_mask=calls[0][1], **kwargs), solo[0])


def test_virtual_kv_memory_is_mapped_and_freed_from_threads_that_never_touched_cuda():
    """A caller's worker thread or a garbage-collecting thread has no current CUDA context: the driver calls behind
    the growable KV cache must bind the device's own, or mapping fails and a collected cache leaks its memory."""
    from hf_minivllm.engine.cuda_vmm import VirtualRange, allocation_granularity

    device = torch.device("cuda", torch.cuda.current_device())
    granularity = allocation_granularity(device)
    made: list[VirtualRange] = []
    errors: list[BaseException] = []

    def on_a_fresh_thread(work):
        def run():
            try:
                work()
            except BaseException as error:  # noqa: BLE001 - handed to the test's thread
                errors.append(error)
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        assert not errors, errors

    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info(device)[0]
    on_a_fresh_thread(lambda: made.append(VirtualRange(device, 64 * granularity)))
    on_a_fresh_thread(lambda: made[0].map(0, 32 * granularity))
    view = made[0].tensor()[:32 * granularity]
    view.fill_(7)
    assert int(view.sum()) == 7 * 32 * granularity
    torch.cuda.synchronize()
    free_mapped = torch.cuda.mem_get_info(device)[0]
    assert free_before - free_mapped >= 32 * granularity
    del view
    on_a_fresh_thread(made[0].close)
    assert made[0].address is None
    # Measured from the mapped state: the first sum may have loaded kernels and cached memory of PyTorch's own.
    assert torch.cuda.mem_get_info(device)[0] - free_mapped >= 32 * granularity, "the physical memory went back"


class _AllLayers:
    """The one part of a model that ``capture_graph`` needs."""

    @staticmethod
    @contextlib.contextmanager
    def only_layers(layers):
        yield


def test_a_failed_graph_capture_leaves_random_draws_memory_and_later_captures_working():
    """A capture invalidated by an operation it does not allow (a host sync here) cannot end. torch 2.11 then left
    its CUDA default generator in capture mode (every later random draw in the process raised), its allocator
    routing to the capture's pool (``empty_cache`` handed nothing back: a closed engine's memory stayed reserved),
    and the capture's reference on the pool, which the graphs before it share (their memory was never freed)."""
    from hf_minivllm.engine.cuda_graphs import capture_graph

    torch.cuda.empty_cache()
    reserved_before = torch.cuda.memory_reserved()
    stream = torch.cuda.Stream()
    ones = torch.ones(4, device="cuda")
    out = torch.zeros(4, device="cuda")
    passes = []

    def with_activations(scale):
        activations = torch.ones(1 << 26, device="cuda")  # 256 MiB, in the graphs' pool when captured
        out.copy_(ones * scale + activations[:4] - 1)

    def syncs_while_captured():
        passes.append(len(passes))
        with_activations(2)
        if len(passes) == 2:  # the first pass runs before the capture
            out.sum().item()

    first = capture_graph(_AllLayers(), [], lambda: with_activations(3), None, stream)
    with pytest.raises(RuntimeError):
        capture_graph(_AllLayers(), [], syncs_while_captured, first.pool(), stream)
    assert passes == [0, 1]
    torch.randn(4, device="cuda")
    torch.nn.functional.dropout(ones, 0.5, training=True)
    first.replay()
    assert out.tolist() == [3.0] * 4, "the graph sharing the failed capture's pool still runs"
    later = capture_graph(_AllLayers(), [], lambda: out.copy_(ones * 4), None, stream)
    later.replay()
    assert out.tolist() == [4.0] * 4
    del first, later
    freed = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    del freed
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() - reserved_before < 1 << 27, "freed memory and the pool go back to the driver"


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.8, top_k=20, top_p=0.9)])
def test_sampling_steps_run_while_another_thread_captures_a_cuda_graph(settings):
    """Another engine starting, or a user's own CUDA graph, captures in another thread: with torch 2.11 any draw
    from its CUDA default generator meanwhile raised, so the sampled steps draw from the engine's own generator."""
    model = tiny_model("qwen3").cuda()
    cpu_state, cuda_state = torch.get_rng_state(), torch.cuda.get_rng_state()
    llm = LLM(model, max_model_len=256, max_num_seqs=8)
    assert torch.equal(torch.get_rng_state(), cpu_state), "building an engine leaves the caller's draws alone"
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    params = SamplingParams(max_tokens=24, ignore_eos=True, **settings)
    torch.manual_seed(0)
    alone = llm.generate([[5, 6, 7, 8], [9, 10]], params, use_tqdm=False)
    capturing, release, errors = threading.Event(), threading.Event(), []

    def hold_a_capture_open():
        try:
            scratch = torch.zeros(4, device="cuda")
            side = torch.cuda.Stream()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(side):
                graph.capture_begin(capture_error_mode="thread_local")
                scratch.add_(1)
                capturing.set()
                release.wait(timeout=120)
                graph.capture_end()
        except BaseException as error:  # noqa: BLE001 - handed to the test's thread
            errors.append(error)
            capturing.set()

    thread = threading.Thread(target=hold_a_capture_open)
    thread.start()
    try:
        assert capturing.wait(timeout=60)
        torch.manual_seed(0)
        during = llm.generate([[5, 6, 7, 8], [9, 10]], params, use_tqdm=False)
    finally:
        release.set()
        thread.join()
    assert not errors, errors
    assert during == alone, "torch.manual_seed still makes the draws repeatable"


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_generate_under_cuda_autocast_computes_in_the_models_dtype(enforce_eager):
    """Under the caller's bf16 autocast the rotary kernel got bf16 q/k beside its float32 table and raised; graphs
    captured in float32 would have run beside eager passes in bf16. The engine computes as if autocast were off."""
    model = tiny_model("qwen3").cuda()
    oracle = copy.deepcopy(model)
    ids, mask = left_padded((30, 11, 22, 5))
    expected = oracle.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        hf_minivllm.accelerate(model, enforce_eager=enforce_eager, max_num_seqs=16, max_model_len=256)
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    assert torch.equal(got, expected)
    assert hf_minivllm.stats(model)["fallbacks"] == 0


def test_a_cuda_default_device_around_sampled_calls():
    """``with torch.device("cuda")`` around a call: the engine's host-side tensors (pinned copies, per-step seeds)
    stay on the host; before, a pinned tensor asked for in the default device raised, and each step's seed was a
    device draw read back with a sync."""
    llm = LLM(tiny_model("qwen3").cuda(), max_model_len=256, max_num_seqs=8)
    params = SamplingParams(temperature=0.8, top_k=20, max_tokens=16, logprobs=2)
    with torch.device("cuda"):
        torch.manual_seed(0)
        first = llm.generate([[5, 6, 7, 8], [9, 10]], params, use_tqdm=False)
    torch.manual_seed(0)
    assert llm.generate([[5, 6, 7, 8], [9, 10]], params, use_tqdm=False) == first
