"""Start-up's concurrent compiles: inside ``compile_ahead`` a launch only compiles, in that thread alone.

The compiles themselves need a GPU (the engine runs them on CUDA only): the GPU tests check that nothing compiles
after start-up and that the answers stay token-exact."""
import threading

import pytest
import torch

from hf_minivllm.kernels.launch import can_compile_ahead, compile_ahead, launch

pytestmark = pytest.mark.skipif(not can_compile_ahead(), reason="this Triton has no asynchronous compile mode")


class RecordingKernel:
    """Stands in for a Triton kernel: records launches (``kernel[grid](...)``) and compiles (``warmup``)."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(("run", grid, args, kwargs))

    def warmup(self, *args, grid, **kwargs):
        self.calls.append(("compile", grid, args, kwargs))


def test_launch_runs_outside_and_only_compiles_inside_compile_ahead():
    kernel = RecordingKernel()
    launch(kernel, (2,), "x", BLOCK=16)
    with compile_ahead(max_threads=2):
        launch(kernel, (3, 1), "y", BLOCK=32)
    launch(kernel, (4,), "z", BLOCK=64)
    assert kernel.calls == [("run", (2,), ("x",), {"BLOCK": 16}), ("compile", (3, 1), ("y",), {"BLOCK": 32}),
                            ("run", (4,), ("z",), {"BLOCK": 64})]


def test_other_threads_keep_running_their_kernels_meanwhile():
    """Another engine's loop thread launches while this one starts up: its kernels must run, not just compile."""
    kernel = RecordingKernel()
    with compile_ahead(max_threads=2):
        other = threading.Thread(target=launch, args=(kernel, (1,), "other thread"))
        other.start()
        other.join()
        launch(kernel, (1,), "this thread")
    assert sorted(call[:3] for call in kernel.calls) == [("compile", (1,), ("this thread",)),
                                                          ("run", (1,), ("other thread",))]


def test_launches_run_again_after_an_error_inside_the_block():
    kernel = RecordingKernel()
    with pytest.raises(KeyError):
        with compile_ahead(max_threads=1):
            raise KeyError("a failing pass")
    launch(kernel, (1,))
    assert kernel.calls == [("run", (1,), (), {})]


def test_each_variant_is_submitted_once():
    """A pass launches each variant hundreds of times (every layer, every bucket); Triton's own cache key costs
    milliseconds, so repeats are dropped first. What Triton specialises on still makes a new variant."""
    kernel = RecordingKernel()
    aligned = torch.zeros(64)
    with compile_ahead(max_threads=2):
        for _ in range(3):
            launch(kernel, (8,), aligned, 7, BLOCK=16)
        launch(kernel, (9,), torch.zeros(64), 9, BLOCK=16)  # another tensor, same dtype and alignment, another int
        launch(kernel, (8,), aligned[1:], 7, BLOCK=16)  # misaligned by 4 bytes
        launch(kernel, (8,), aligned.double(), 7, BLOCK=16)  # another dtype
        launch(kernel, (8,), aligned, 1, BLOCK=16)  # an integer of 1
        launch(kernel, (8,), aligned, 32, BLOCK=16)  # a multiple of 16
        launch(kernel, (8,), aligned, 7, BLOCK=32)  # another constexpr
    assert [call[0] for call in kernel.calls] == ["compile"] * 6


def test_an_argument_that_cannot_be_hashed_is_still_submitted():
    kernel = RecordingKernel()
    with compile_ahead(max_threads=1):
        launch(kernel, (1,), OPTIONS=[1, 2])
    assert kernel.calls == [("compile", (1,), (), {"OPTIONS": [1, 2]})]


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_the_engines_compile_passes_leave_it_token_exact(family, monkeypatch):
    """The runner's passes (the warm-up, one decode pass per graph bucket on a scratch cache) run at start-up on
    CUDA; here on the CPU's torch path, which launches no Triton kernel, so that what they run besides the kernels
    (scratch caches, metadata, the decode shapes) is checked in CI: the engine answers as one built without them."""
    import copy

    from conftest import tiny_model
    from hf_minivllm import LLM, SamplingParams
    from hf_minivllm.engine import model_runner

    ran = []
    original = model_runner.ModelRunner._decode_compile_passes
    monkeypatch.setattr(model_runner.ModelRunner, "_decode_compile_passes",
                        lambda runner, buckets: ran.extend(buckets) or original(runner, buckets))
    model = tiny_model(family)
    settings = dict(max_model_len=128, max_num_seqs=20, max_num_batched_tokens=256)
    plain = LLM(copy.deepcopy(model), **settings)
    monkeypatch.setattr(model_runner, "compiles_kernels_ahead", lambda device: True)
    monkeypatch.setattr(model_runner, "FROM_CACHE_S", -1.0)  # the torch path compiles nothing: run them anyway
    compiled = LLM(model, **settings)
    assert sorted(ran) == model_runner.batch_buckets(20)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 320, (n,), generator=generator).tolist() for n in (5, 40, 17, 90)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [out["token_ids"] for out in plain.generate(prompts, params, use_tqdm=False)]
    assert [out["token_ids"] for out in compiled.generate(prompts, params, use_tqdm=False)] == expected


def test_a_failed_compile_is_raised_and_leaves_the_thread_able_to_compile_again(monkeypatch):
    """Triton's asynchronous mode raises a compile error when the block ends; this thread must not be left in that
    mode (its later compiles, a retry or another engine, would go to a closed pool). Triton 3.6's mode stays active
    after such an error (later releases reset it themselves): the test gives the mode that behaviour."""
    import inspect

    from triton.runtime import _async_compile

    from hf_minivllm.kernels import launch as launch_module

    class StaysActiveOnError(_async_compile.AsyncCompileMode):
        def __exit__(self, *exc_info):
            for future in self.raw_futures:
                future.result()  # a compile error leaves here, before the mode is reset
            _async_compile.active_mode.set(None)

    monkeypatch.setattr(launch_module, "AsyncCompileMode", StaysActiveOnError)

    def failing_compile():
        raise RuntimeError("the compiler failed")

    class FailingKernel(RecordingKernel):
        def warmup(self, *args, grid, **kwargs):
            mode = _async_compile.active_mode.get()
            callbacks = [lambda kernel: None] * (len(inspect.signature(mode.submit).parameters) - 2)
            mode.submit("a variant", failing_compile, *callbacks)

    with pytest.raises(RuntimeError, match="the compiler failed"):
        with compile_ahead(max_threads=1):
            launch(FailingKernel(), (1,))
    assert _async_compile.active_mode.get() is None
    kernel = RecordingKernel()
    with compile_ahead(max_threads=1):
        launch(kernel, (1,))
    assert kernel.calls == [("compile", (1,), (), {})]


def test_decode_passes_are_skipped_when_the_warm_up_compiled_nothing(monkeypatch):
    """Compiles of milliseconds were reads from Triton's cache: the other decode buckets' variants will load from it
    as quickly, so their passes are not worth their eager forwards."""
    from conftest import tiny_model
    from hf_minivllm import LLM
    from hf_minivllm.engine import model_runner

    ran = []
    monkeypatch.setattr(model_runner.ModelRunner, "_decode_compile_passes", lambda runner, buckets: ran.append(buckets))
    monkeypatch.setattr(model_runner, "compiles_kernels_ahead", lambda device: True)
    LLM(tiny_model("qwen3"), max_model_len=128, max_num_seqs=4, max_num_batched_tokens=128)
    assert ran == [[4]]  # the largest bucket only: it tells a cache filled under other settings


def test_the_pool_reports_its_longest_compile():
    import time

    with compile_ahead(max_threads=2) as pool:
        for delay in (0.0, 0.15, 0.01):
            pool.submit(time.sleep, delay)
        assert 0.15 <= pool.wait() < 1.0
    assert len(pool.compiled) == 3


def test_each_launcher_is_built_once_per_signature_after_the_compiles(monkeypatch):
    """Triton builds a compiled kernel's launcher (a C module) at its first launch, one after another; the pool
    builds them concurrently when the block ends, one per list of argument types."""
    import importlib
    from types import SimpleNamespace

    triton_driver = importlib.import_module("triton.runtime.driver")  # the module (triton.runtime.driver is its object)
    built = []
    monkeypatch.setattr(triton_driver, "driver", SimpleNamespace(
        active=SimpleNamespace(launcher_cls=lambda src, metadata: built.append((src.name, metadata)))))

    def compiled(name, signature, constants):
        return SimpleNamespace(src=SimpleNamespace(name=name, signature=signature, constants=constants),
                               metadata=SimpleNamespace())

    kernels = [compiled("a", {"x": "*fp16", "n": "i32"}, {}), compiled("b", {"y": "*fp16", "m": "i32"}, {}),
               compiled("c", {"x": "*fp16", "BLOCK": "constexpr"}, {(1,): 16}),
               compiled("d", {"n": "i32", "x": "*fp16"}, {})]
    with compile_ahead(max_threads=2) as pool:
        pool.submit(lambda: None)  # a job whose result is no kernel: skipped
        for kernel in kernels:
            pool.submit(lambda kernel=kernel: kernel)
    names = sorted(name for name, _ in built)
    assert len(names) == 3 and names[0] in "ab" and names[1:] == ["c", "d"]  # argument order counts


def test_every_tensor_parallel_rank_runs_the_decode_passes_when_one_compiled(monkeypatch):
    """The decode passes run all-reduces: a rank whose warm-up found every variant in Triton's cache must still run
    them when another rank compiled (ranks deciding apart would wait on each other's collectives for ever)."""
    from types import SimpleNamespace

    from hf_minivllm.engine import model_runner

    class OtherRankCompiled:
        def min(self, value):
            return 0

    class EveryRankFromCache:
        def min(self, value):
            return value

    for group, expected in ((None, [[8]]), (EveryRankFromCache(), [[8]]), (OtherRankCompiled(), [[8], [1, 2, 4]])):
        ran = []
        runner = SimpleNamespace(device=torch.device("cpu"), group=group, config=SimpleNamespace(max_num_seqs=8),
                                 _warm_up=lambda: None, _decode_compile_passes=ran.append, _synchronize=lambda: None,
                                 _cascade=False)
        model_runner.ModelRunner._compile_kernels_ahead(runner)
        assert ran == expected
