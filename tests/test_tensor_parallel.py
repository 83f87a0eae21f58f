"""Tensor parallelism on CPU (gloo, worker processes): token-exact with TP=1, worker lifetime, bad sizes rejected.

Every engine here starts real worker processes (``hf_minivllm.tp.worker``), as on GPUs; only the backend differs.
"""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import hf_minivllm
from conftest import shared_prefix_prompts, tiny_model
from hf_minivllm import LLM, SamplingParams
from hf_minivllm.engine.llm_engine import EngineClosed
from hf_minivllm.tp import TensorParallelError, TensorParallelWorkers, tensor_parallel_devices
from workloads import left_padded

ENGINE = dict(cpu_kvcache_space_gib=0.02, kvcache_block_size=8)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompts(count: int = 6, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = [3, 17, 9, 40, 1, 25, 12, 30][:count]
    return [torch.randint(3, 300, (n,), generator=generator).tolist() for n in lengths]


def tp1_tokens(model, batch=None, params=GREEDY) -> list[list[int]]:
    """TP=1 on a copy (an engine re-points the model's q/k/v storage, which another engine would see as new
    tensors)."""
    with LLM(copy.deepcopy(model), **ENGINE) as llm:
        return [out["token_ids"] for out in llm.generate(batch or prompts(), params, use_tqdm=False)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids: list[int], timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(alive(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen3_moe"])
def test_tp2_matches_tp1(family):
    """Each family's sharding (dense, fused qkv and gate_up, experts): LLM(model) at TP=2 equals TP=1, greedy."""
    model = tiny_model(family)
    expected = tp1_tokens(model)
    with LLM(model, tensor_parallel_size=2, **ENGINE) as llm:
        assert [out["token_ids"] for out in llm.generate(prompts(), GREEDY, use_tqdm=False)] == expected
        pids = llm._workers.pids
    assert wait_gone(pids)


def test_tp2_through_a_path_and_accelerate(tmp_path):
    """LLM(path) and accelerate(model).generate (a left-padded batch) at TP=2 equal TP=1 and HF, greedy."""
    model = tiny_model("qwen3")
    expected = tp1_tokens(model)
    model.save_pretrained(tmp_path)
    with LLM(str(tmp_path), tensor_parallel_size=2, **ENGINE) as llm:
        assert [out["token_ids"] for out in llm.generate(prompts(), GREEDY, use_tqdm=False)] == expected
    assert_accelerated_tp2_matches_hf(model, prompts(4, seed=3))


def assert_accelerated_tp2_matches_hf(model, batch: list[list[int]]) -> None:
    """``accelerate(model, tensor_parallel_size=2).generate`` on a left-padded batch equals HF's greedy generate."""
    reference = model.generate(**_left_padded(batch), max_new_tokens=10, do_sample=False, pad_token_id=0)
    accelerated = hf_minivllm.accelerate(model, tensor_parallel_size=2, **ENGINE)
    try:
        assert hf_minivllm.stats(accelerated)["unsupported_reason"] is None
        out = accelerated.generate(**_left_padded(batch), max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert torch.equal(out, reference)
    finally:
        hf_minivllm.restore(model)


def _left_padded(batch: list[list[int]], device: str = "cpu") -> dict:
    ids, mask = left_padded(batch, device)
    return {"input_ids": ids, "attention_mask": mask}


def test_tp2_gemma2_is_token_exact_with_hf():
    """Gemma 2 at TP=2 (heads split per rank, each with its window and soft-cap; scaled embedding and final
    soft-cap after the gathers): accelerate(model).generate on a left-padded batch longer than the window equals
    HF's greedy generate."""
    model = tiny_model("gemma2")
    batch = prompts(4, seed=5)
    assert_accelerated_tp2_matches_hf(model, batch)


def test_tp4_replicates_kv_heads_and_matches_tp1():
    """4 ranks over 4 query heads and 2 KV heads (each KV head on two ranks); a vocabulary of 331 padded to 4 x 83;
    chunked prefill, mixed steps and a cache small enough to preempt."""
    model = tiny_model("qwen2", vocab_size=331)
    config = dict(num_kvcache_blocks=24, kvcache_block_size=4, max_num_batched_tokens=32)
    batch = prompts(8)
    with LLM(model, **config) as llm:
        expected = [out["token_ids"] for out in llm.generate(batch, GREEDY, use_tqdm=False)]
    with LLM(model, tensor_parallel_size=4, **config) as llm:
        assert [out["token_ids"] for out in llm.generate(batch, GREEDY, use_tqdm=False)] == expected
        assert llm.model.num_kv_heads == 1
        assert llm.stats.preemptions > 0


def test_training_between_calls_reaches_every_rank():
    """In-place optimizer steps (new values) and a replaced parameter (a rebuild) are both served at TP=2."""
    model = tiny_model("qwen3")
    llm = LLM(model, tensor_parallel_size=2, **ENGINE)
    try:
        assert [out["token_ids"] for out in llm.generate(prompts(), GREEDY, use_tqdm=False)] == tp1_tokens(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        ids = torch.tensor([prompts(1, seed=5)[0] * 3])
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.eval()
        expected = tp1_tokens(model)
        assert [out["token_ids"] for out in llm.generate(prompts(), GREEDY, use_tqdm=False)] == expected
        with torch.no_grad():
            layer = model.model.layers[1].mlp
            layer.down_proj.weight = torch.nn.Parameter(layer.down_proj.weight * 1.5)
        expected = tp1_tokens(model)
        assert [out["token_ids"] for out in llm.generate(prompts(), GREEDY, use_tqdm=False)] == expected
        assert llm.stats.rebuilds == 1
    finally:
        llm.close()


def test_an_edit_made_while_the_shards_are_built_reaches_the_ranks(monkeypatch):
    """Each rank copies its shard while ``LLM`` builds the decoder: an in-place edit landing after those copies
    (another thread training) must still reach the ranks at the first call."""
    model = tiny_model("qwen3")
    build = LLM._build_decoder

    def build_then_edit(llm):
        decoder = build(llm)
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.mul_(-1.5)
        monkeypatch.setattr(LLM, "_build_decoder", build)  # once: a rebuild reads the edited model
        return decoder

    monkeypatch.setattr(LLM, "_build_decoder", build_then_edit)
    with LLM(model, tensor_parallel_size=2, **ENGINE) as llm:
        assert [out["token_ids"] for out in llm.generate(prompts(), GREEDY, use_tqdm=False)] == tp1_tokens(model)


def test_tp2_moe_sees_an_expert_weight_changed_in_place():
    """Qwen3-MoE at TP=2 (each rank holds its slice of every expert): an in-place edit of one expert's stacked
    weights reaches the ranks."""
    model = tiny_model("qwen3_moe")
    with LLM(model, tensor_parallel_size=2, **ENGINE) as llm:
        first = [out["token_ids"] for out in llm.generate(prompts(), GREEDY, use_tqdm=False)]
        assert first == tp1_tokens(model)
        with torch.no_grad():
            model.model.layers[2].mlp.experts.gate_up_proj[5].mul_(-1.5)
        expected = tp1_tokens(model)
        assert expected != first, "the change must matter, or the test proves nothing"
        assert [out["token_ids"] for out in llm.generate(prompts(), GREEDY, use_tqdm=False)] == expected
        assert llm.stats.rebuilds == 0


def test_two_engines_at_once_and_nothing_left_after_close():
    model_a, model_b = tiny_model("qwen3", seed=1), tiny_model("llama", seed=2)
    expected_a, expected_b = tp1_tokens(model_a), tp1_tokens(model_b)
    llm_a = LLM(model_a, tensor_parallel_size=2, **ENGINE)
    llm_b = LLM(model_b, tensor_parallel_size=2, **ENGINE)
    pids = llm_a._workers.pids + llm_b._workers.pids
    assert [out["token_ids"] for out in llm_b.generate(prompts(), GREEDY, use_tqdm=False)] == expected_b
    assert [out["token_ids"] for out in llm_a.generate(prompts(), GREEDY, use_tqdm=False)] == expected_a
    llm_a.close()
    llm_b.close()
    assert wait_gone(pids)
    with pytest.raises(EngineClosed):
        llm_a.generate(prompts(), GREEDY, use_tqdm=False)


def test_garbage_collection_stops_the_workers():
    import gc

    llm = LLM(tiny_model("qwen3"), tensor_parallel_size=2, **ENGINE)
    llm.generate(prompts(2), GREEDY, use_tqdm=False)
    pids = llm._workers.pids
    del llm
    gc.collect()
    assert wait_gone(pids)


def test_killed_worker_raises_within_seconds():
    llm = LLM(tiny_model("qwen3"), tensor_parallel_size=2, **ENGINE)
    try:
        os.kill(llm._workers.pids[0], signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(TensorParallelError):
            llm.generate(prompts(), SamplingParams(temperature=0, max_tokens=200, ignore_eos=True), use_tqdm=False)
        assert time.monotonic() - started < 30
        with pytest.raises(TensorParallelError):  # and stays broken, fast, rather than hanging
            llm.generate(prompts(1), GREEDY, use_tqdm=False)
    finally:
        llm.close()


def test_a_worker_dead_before_close_still_leaves_rank_0_released():
    """A worker that died while the engine was idle is first noticed by close(), which raises; rank 0's KV cache
    (and on GPUs its CUDA graphs, which the communicator's abort waits for) are released all the same."""
    llm = LLM(tiny_model("qwen3"), tensor_parallel_size=2, **ENGINE)
    llm.generate(prompts(2), GREEDY, use_tqdm=False)
    pids = llm._workers.pids
    os.kill(pids[0], signal.SIGKILL)
    assert wait_gone(pids)
    with pytest.raises(TensorParallelError, match="exited"):
        llm.close()
    runner = llm.engine.runner
    assert runner.kv_cache is None and runner.storage.tensor.numel() == 0
    assert runner.graphs is None and runner.prefill_graphs is None


_EXIT_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import tiny_model
    from hf_minivllm import LLM, SamplingParams
    llm = LLM(tiny_model("qwen3"), tensor_parallel_size=2, cpu_kvcache_space_gib=0.02)
    llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    print(" ".join(map(str, llm._workers.pids)), flush=True)
    if sys.argv[1] == "interrupt":
        raise KeyboardInterrupt
""")


def test_workers_end_with_the_program(tmp_path):
    """A program that ends (normally, or by an uncaught Ctrl-C) without closing its engine leaves no worker."""
    script = tmp_path / "program.py"
    script.write_text(_EXIT_SCRIPT.format(tests=os.path.dirname(__file__)))
    # A module in the script's folder that shadows the standard library (posixpath/ntpath try `import nt`): the
    # workers get the caller's sys.path after their own, so they never import it.
    (tmp_path / "nt.py").write_text("raise RuntimeError('a worker imported the script folder before the stdlib')\n")
    programs = {ending: subprocess.Popen([sys.executable, str(script), ending], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True) for ending in ("exit", "interrupt")}
    for ending, program in programs.items():
        out, err = program.communicate(timeout=180)
        assert (program.returncode == 0) == (ending == "exit"), err
        pids = [int(pid) for pid in out.split()]
        assert len(pids) == 1 and wait_gone(pids), ending


def test_impossible_sizes_are_rejected_before_anything_starts(monkeypatch):
    started = []
    monkeypatch.setattr(TensorParallelWorkers, "__init__", lambda self, *a, **k: started.append(1) or 1 / 0)
    model = tiny_model("qwen3")  # 4 query heads, 2 KV heads
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide the attention heads"):
        LLM(model, tensor_parallel_size=3, **ENGINE)
    with pytest.raises(ValueError, match="tensor_parallel_size=8 must divide"):
        LLM(model, tensor_parallel_size=8, **ENGINE)
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        LLM(model, tensor_parallel_size=0, **ENGINE)
    with pytest.raises(ValueError, match="kv_cache_resident=False"):
        LLM(model, tensor_parallel_size=2, kv_cache_resident=False, **ENGINE)
    assert not started
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs 2 GPUs, but 1 are visible"):
        tensor_parallel_devices(torch.device("cuda", 0), 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert tensor_parallel_devices(torch.device("cuda", 2), 3, [torch.device("cuda", 2), torch.device("cuda", 3)]) \
        == [torch.device("cuda", 2), torch.device("cuda", 3), torch.device("cuda", 0)]


@pytest.mark.gpu
@pytest.mark.parametrize("tp", [2, 4])
def test_tp_on_gpus_matches_tp1(tp):
    """fp32 on 2 or 4 GPUs (NCCL and the peer all-reduce, CUDA graphs on every rank, async scheduling, mixed
    steps): token-exact with TP=1."""
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} GPUs")
    model = tiny_model("qwen3").cuda()
    batch = prompts(8)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    with LLM(model, gpu_memory_utilization=0.3) as llm:
        expected = [out["token_ids"] for out in llm.generate(batch, params, use_tqdm=False)]
    with LLM(model, tensor_parallel_size=tp, gpu_memory_utilization=0.3) as llm:
        assert llm.engine.runner.graphs is not None
        if all(torch.cuda.can_device_access_peer(0, peer) for peer in range(1, tp)):
            # Rank 0 joins the group from a thread of its own: the one-shot all-reduce must still be set up there.
            assert llm._workers.group.peer_all_reduce is not None
        assert [out["token_ids"] for out in llm.generate(batch, params, use_tqdm=False)] == expected
        pids = llm._workers.pids
    assert wait_gone(pids)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tp2_cascade_attention_gives_the_tp1_tokens():
    """fp32, 40 requests sharing a 600-token prefix: every rank takes the cascade graphs (captured at the first
    cascade step, on all ranks at once) and the tokens equal TP=1 without cascade attention."""
    model = tiny_model("qwen3").cuda()
    batch = shared_prefix_prompts(40, 600, seed=5, max_own=30)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    engine = dict(max_num_seqs=64, max_model_len=1024, gpu_memory_utilization=0.3)
    with LLM(copy.deepcopy(model), cascade_attention=False, **engine) as llm:
        expected = [out["token_ids"] for out in llm.generate(batch, params, use_tqdm=False)]
    with LLM(model, tensor_parallel_size=2, **engine) as llm:
        assert [out["token_ids"] for out in llm.generate(batch, params, use_tqdm=False)] == expected
        assert llm.engine.runner.graphs.cascade_graphs


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_spread_over_two_gpus_is_served_where_it_lies(tmp_path):
    """A model dispatched over two GPUs the way ``device_map="auto"`` does is served at TP=2 by default (LLM and
    accelerate), token-exact with the same weights on one GPU and with HF's own generate on the spread model; a saved
    copy through ``LLM(path, tensor_parallel_size=2)`` too."""
    from accelerate import dispatch_model

    model = tiny_model("llama")  # untied: the LM head may lie on the other GPU
    model.save_pretrained(tmp_path)
    model = model.cuda()
    batch = prompts(6)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with LLM(copy.deepcopy(model), gpu_memory_utilization=0.3) as llm:
        expected = [out["token_ids"] for out in llm.generate(batch, params, use_tqdm=False)]
    with LLM(str(tmp_path), tensor_parallel_size=2, gpu_memory_utilization=0.3) as llm:
        assert [out["token_ids"] for out in llm.generate(batch, params, use_tqdm=False)] == expected

    layers = model.config.num_hidden_layers
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1,
                  **{f"model.layers.{index}": int(index >= layers // 2) for index in range(layers)}}
    dispatch_model(model, device_map=device_map)
    assert {param.device.index for param in model.parameters()} == {0, 1}
    with LLM(model, gpu_memory_utilization=0.3) as llm:
        assert llm.config.tensor_parallel_size == 2
        assert [out["token_ids"] for out in llm.generate(batch, params, use_tqdm=False)] == expected

    padded = _left_padded(prompts(4, seed=3), "cuda")
    reference = model.generate(**padded, max_new_tokens=10, do_sample=False, pad_token_id=0)
    accelerated = hf_minivllm.accelerate(model, gpu_memory_utilization=0.3)
    try:
        assert hf_minivllm.stats(accelerated)["unsupported_reason"] is None
        assert torch.equal(accelerated.generate(**padded, max_new_tokens=10, do_sample=False, pad_token_id=0),
                           reference)
    finally:
        hf_minivllm.restore(model)


def _pattern(n: int, rank: int, call: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Small integers (exact in bf16 and in any sum order), different per rank and per call."""
    return ((torch.arange(n, device=device) * (rank + 3) + call) % 17).to(dtype)


def _peer_all_reduce_rank(rank: int, port: int, world: int) -> None:
    from hf_minivllm.layers.parallel import ParallelGroup

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    group = ParallelGroup.connect(rank, world, port, device, timeout_s=60)
    assert group.peer_all_reduce is not None
    assert group.peer_all_reduce.fits(torch.empty(1 << 17))  # the largest tensors below take the peer path
    sizes = torch.randint(1, 1 << 17, (400,), generator=torch.Generator().manual_seed(0)).tolist()  # <= 512 KiB
    results = []
    for call, n in enumerate(sizes):  # back to back, no synchronisation: the halves are reused every other call
        dtype = torch.bfloat16 if call % 2 else torch.float32
        x = _pattern(n, rank, call, dtype, device)
        group.all_reduce(x)
        results.append((x, sum(_pattern(n, r, call, dtype, device) for r in range(world))))
    assert all(torch.equal(x, expected) for x, expected in results)
    inputs = [torch.empty(n, dtype=torch.bfloat16, device=device) for n in (1, 4096, 65536, 777, 1 << 18)]
    for x in inputs:  # warm-up outside the graph (compiles)
        group.all_reduce(x.zero_())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for x in inputs:
            group.all_reduce(x)
    for replay in range(50):
        for x in inputs:
            x.copy_(_pattern(x.numel(), rank, replay, x.dtype, device))
        graph.replay()
        for x in inputs:
            assert torch.equal(x, sum(_pattern(x.numel(), r, replay, x.dtype, device) for r in range(world)))
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 4])
def test_peer_all_reduce_on_gpus(world):
    """The one-shot all-reduce through peer memory over 2 or 4 GPUs: 400 calls of random sizes back to back, then in
    a CUDA graph replayed 50 times with new inputs; every result exact."""
    from hf_minivllm.layers.parallel import ParallelGroup

    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    store = ParallelGroup.create_store(world, timeout_s=60)
    torch.multiprocessing.start_processes(_peer_all_reduce_rank, args=(store.port, world), nprocs=world,
                                          start_method="spawn")


def test_offloaded_weights_fall_back_and_a_spread_model_needs_its_size(monkeypatch):
    """Weights partly on another device (offloaded) keep HF's generate with one warning; a model spread over GPUs is
    served at that tensor-parallel size by default, and an explicit other size is refused."""
    import hf_minivllm.models.adapter as adapter

    model = tiny_model("qwen3")
    model.model.layers[1].mlp.down_proj.to("meta")
    with pytest.warns(UserWarning, match="offloaded"):
        hf_minivllm.accelerate(model, **ENGINE)
    assert "offloaded" in hf_minivllm.stats(model)["unsupported_reason"]
    hf_minivllm.restore(model)

    model = tiny_model("llama")
    monkeypatch.setattr(adapter, "spread_size", lambda hf_model: 2)
    with pytest.raises(adapter.UnsupportedModel, match="serve it with tensor_parallel_size=2"):
        adapter.check_tensor_parallel(model, 1)
    monkeypatch.setattr(hf_minivllm.llm, "spread_size", lambda hf_model: 2)
    monkeypatch.setattr(TensorParallelWorkers, "__init__", lambda self, devices, *a, **k: (_ for _ in ()).throw(
        RuntimeError(f"would start {len(devices)} ranks")))
    with pytest.raises(RuntimeError, match="would start 2 ranks"):
        LLM(model, **ENGINE)


def test_a_worker_that_cannot_start_raises_at_once(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/bin/false")
    started = time.monotonic()
    with pytest.raises(TensorParallelError, match="exited while starting"):
        LLM(tiny_model("qwen3"), tensor_parallel_size=2, **ENGINE)
    assert time.monotonic() - started < 30


def test_a_worker_failing_before_it_joins_the_group_raises_its_cause_at_once():
    """A worker whose device cannot be set up exits before the ranks' rendezvous: rank 0 must raise the worker's
    traceback within seconds, not wait out the rendezvous timeout and then raise a store timeout naming no cause."""
    started = time.monotonic()
    with pytest.raises(TensorParallelError, match="worker failed: Traceback"):
        TensorParallelWorkers([torch.device("cpu"), torch.device("cuda", 1000)], timeout_s=30)
    assert time.monotonic() - started < 20


def test_rank_0_failing_alone_mid_step_breaks_the_engine_loudly(monkeypatch):
    """The workers took the step; rank 0 failed in it: they are out of step, so every later call raises at once
    (never a hang, never a mismatched collective), and close() still returns."""
    import hf_minivllm.engine.model_runner as model_runner

    llm = LLM(tiny_model("qwen3"), tensor_parallel_size=2, **ENGINE)
    real_sample = model_runner.sample

    def failing_sample(*args, **kwargs):
        monkeypatch.setattr(model_runner, "sample", real_sample)
        raise MemoryError("rank 0 alone")

    monkeypatch.setattr(model_runner, "sample", failing_sample)
    with pytest.raises(BaseException, match="rank 0 alone"):
        llm.generate(prompts(2), GREEDY, use_tqdm=False)
    started = time.monotonic()
    with pytest.raises(TensorParallelError, match="rank 0 failed in the middle of a step"):
        llm.generate(prompts(2), GREEDY, use_tqdm=False)
    llm.close()
    assert time.monotonic() - started < 30


def test_param_data_edits_reach_the_ranks_with_reset_prefix_cache():
    model = tiny_model("qwen3")
    with LLM(model, tensor_parallel_size=2, **ENGINE) as llm:
        before = [out["token_ids"] for out in llm.generate(prompts(), GREEDY, use_tqdm=False)]
        with torch.no_grad():
            generator = torch.Generator().manual_seed(7)
            for param in model.parameters():
                if param.dim() > 1:  # no version counter sees edits through .data
                    param.data.add_(torch.randn(param.shape, generator=generator) * 0.1)
        llm.reset_prefix_cache()
        after = [out["token_ids"] for out in llm.generate(prompts(), GREEDY, use_tqdm=False)]
    assert after != before and after == tp1_tokens(model)


def test_stop_token_ids_outside_the_vocabulary_are_rejected():
    with LLM(tiny_model("qwen3"), **ENGINE) as llm:
        with pytest.raises(ValueError, match="stop_token_ids must be token ids in"):
            llm.generate([[5, 6]], SamplingParams(min_tokens=2, stop_token_ids=[10**6]), use_tqdm=False)
        assert llm.generate([[5, 6]], GREEDY, use_tqdm=False)[0]["token_ids"]
