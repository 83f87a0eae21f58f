"""The KV cache sized to the work in hand (accelerate's default) or resident (LLM's default), on the CPU path.

The CUDA path (virtual memory, graphs that survive growth) is covered by the GPU tests in test_gpu_engine.py.
"""
import copy

import pytest
import torch

import hf_minivllm
from hf_minivllm import LLM, Config, SamplingParams
from hf_minivllm.engine.kv_storage import FixedKVStorage, ReallocKVStorage
from conftest import left_padded_batch, tiny_model

SMALL_CONTEXT = dict(max_model_len=64, kvcache_block_size=4)  # floor: 16 blocks


def engine_of(model):
    return model._hf_minivllm.llm.engine


def recorded_sizes(engine):
    """Every size the KV storage is asked to grow to, as it happens."""
    sizes, grow = [], engine.runner.storage.grow

    def spy(*args):
        sizes.append(grow(*args))
        return sizes[-1]

    engine.runner.storage.grow = spy
    return sizes


def test_accelerate_grows_the_cache_for_the_work_and_gives_it_back_when_idle():
    model = tiny_model("llama")
    oracle = copy.deepcopy(model)
    hf_minivllm.accelerate(model, **SMALL_CONTEXT)
    engine = engine_of(model)
    storage = engine.runner.storage
    assert isinstance(storage, ReallocKVStorage) and storage.num_blocks == storage.floor_blocks == 16
    sizes = recorded_sizes(engine)
    lengths = (30, 25, 31, 12, 28, 30, 20, 29)
    ids, mask = left_padded_batch(lengths=lengths)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert torch.equal(got, oracle.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False))
    longest = sum(-(-(n + 20) // 4) for n in lengths)  # blocks of every request at its longest
    assert sizes == [longest], "grown once, for every request at its longest"
    assert hf_minivllm.stats(model)["preemptions"] == 0
    assert storage.num_blocks == 16 and storage.tensor.shape[2] == 16, "memory above the floor handed back"
    assert engine.scheduler.block_manager.num_blocks == 16


def test_a_cap_bounds_the_growth_and_preemption_keeps_results_exact():
    model = tiny_model("qwen3")
    oracle = copy.deepcopy(model)
    bytes_per_block = 2 * 2 * 2 * 4 * 16 * 4  # K and V, 2 layers, block of 4 tokens, 2 heads of 16, fp32
    hf_minivllm.accelerate(model, kv_cache_memory_gib=40 * bytes_per_block / 2**30, **SMALL_CONTEXT)
    engine = engine_of(model)
    assert engine.runner.capacity_blocks == 40
    sizes = recorded_sizes(engine)
    ids, mask = left_padded_batch(lengths=(30, 25, 31, 12, 28, 30, 20, 29))
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert torch.equal(got, oracle.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False))
    assert max(sizes) == 40 and hf_minivllm.stats(model)["preemptions"] > 0


def test_cached_prefixes_within_the_floor_survive_idle():
    model = hf_minivllm.accelerate(tiny_model("qwen3"), **SMALL_CONTEXT)
    ids, mask = left_padded_batch(lengths=(30,))
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    hits = hf_minivllm.stats(model)["prefix_cache_hit_tokens"]
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert hf_minivllm.stats(model)["prefix_cache_hit_tokens"] >= hits + 28


def test_resident_cache_is_allocated_once_and_kept():
    llm = LLM(tiny_model("llama"), cpu_kvcache_space_gib=0.001, **SMALL_CONTEXT)
    storage = llm.engine.runner.storage
    assert isinstance(storage, FixedKVStorage) and storage.num_blocks == storage.capacity_blocks
    tensor = storage.tensor
    llm.generate([list(range(3, 40))], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    assert storage.tensor is tensor
    model = hf_minivllm.accelerate(tiny_model("llama"), kv_cache_resident=True, cpu_kvcache_space_gib=0.001,
                                   **SMALL_CONTEXT)
    assert isinstance(engine_of(model).runner.storage, FixedKVStorage)


@pytest.mark.parametrize("field, value", [("kv_cache_resident", "yes"), ("kv_cache_memory_gib", 0),
                                          ("kv_cache_memory_gib", -1.0), ("kv_cache_memory_gib", True)])
def test_bad_memory_settings_name_the_argument(field, value):
    with pytest.raises(ValueError, match=field):
        Config(**{field: value})


def test_a_dropped_llm_frees_its_kv_cache_at_once():
    import gc
    import time
    import weakref

    llm = LLM(tiny_model("llama"), num_kvcache_blocks=64)
    llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    storage = weakref.ref(llm.engine.runner.storage)
    gc.disable()  # freed by reference counting, not whenever the collector runs: no cycle may hold the engine
    try:
        del llm
        deadline = time.monotonic() + 1.0
        while storage() is not None and time.monotonic() < deadline:
            time.sleep(0.01)  # the engine's loop thread lets go of it
        assert storage() is None, "nothing of the engine's may keep it (and its KV cache) alive"
    finally:
        gc.enable()


def test_prefill_graph_pool_is_set_aside_from_the_kv_budget_in_proportion_to_its_tokens():
    """The prefill graphs' pool is captured after the cache is sized: the sizing sets aside the warm-up's activation
    peak scaled to the largest graph (2,048 of the warm-up's 16,384 tokens: an eighth), and nothing without graphs."""
    from hf_minivllm import LLM

    runner = LLM(tiny_model("qwen3"), num_kvcache_blocks=64).engine.runner
    assert runner._prefill_graph_pool_estimate(8 << 20) == 0, "no prefill graphs on the torch backend"
    runner.attention_backend = "triton"
    num_seqs, seq_len = runner._warm_up_shape()
    assert num_seqs * seq_len == 16384 and seq_len == runner.config.max_model_len
    assert runner._prefill_graph_pool_estimate(8 << 20) == 1 << 20
    runner.config.max_prefill_graph_tokens = 0
    assert runner._prefill_graph_pool_estimate(8 << 20) == 0


def test_memory_profile_measures_the_prefill_and_the_whole_vocabulary_sort_apart(monkeypatch):
    """The cache is sized after a warm-up prefill and a warm-up sampling, each's activation peak measured on its
    own (the CUDA allocator's counters are faked here). The sampling takes the sort of the whole vocabulary over
    max_num_seqs rows (a chunk of rows at a time: one chunk here), the sampler's largest footprint: a top-k would
    only sort its candidates. The memory in use
    is read with the warm-ups' cached blocks still reserved (see ``_profile_gpu_memory``)."""
    from hf_minivllm.layers import sampler

    runner = LLM(tiny_model("qwen3"), num_kvcache_blocks=64, max_num_seqs=6).engine.runner
    peaks = {"_warm_up_prefill": 7 << 20, "_warm_up_samplers": 3 << 20}
    allocated = {"peak": 0}
    events = []
    for part, peak in peaks.items():
        run = getattr(runner, part)
        monkeypatch.setattr(runner, part, lambda run=run, part=part, peak=peak: (
            run(), allocated.update(peak=peak), events.append(part)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *args: allocated.update(peak=0))
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda *args: {"allocated_bytes.all.peak": allocated["peak"],
                                                                   "allocated_bytes.all.current": 0})

    def mem_get_info(*args):
        events.append("mem_get_info")
        return 60 << 30, 80 << 30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    sorted_shapes = []
    whole_vocabulary = sampler.apply_top_k_top_p_min_p
    def record(logits, temperatures, params):
        if params.use_top_k or params.use_top_p:  # it sorts
            sorted_shapes.append(tuple(logits.shape))
        return whole_vocabulary(logits, temperatures, params)

    monkeypatch.setattr(sampler, "apply_top_k_top_p_min_p", record)
    assert runner._profile_gpu_memory() == (7 << 20, 3 << 20, 20 << 30, 80 << 30)
    assert sorted_shapes == [(6, runner.model.vocab_size)]
    assert events[-2:] == ["_warm_up_samplers", "mem_get_info"]
