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

    def recorded(runner, buckets, cascade=False):
        if not cascade:
            ran.extend(buckets)
        original(runner, buckets, cascade)

    monkeypatch.setattr(model_runner.ModelRunner, "_decode_compile_passes", recorded)
    model = tiny_model(family)
    # A cache of 256 blocks: the CPU's default 4 GiB would be half a million blocks per engine (the passes use a
    # scratch cache of their own).
    settings = dict(max_model_len=128, max_num_seqs=20, max_num_batched_tokens=256, num_kvcache_blocks=256)
    plain = LLM(copy.deepcopy(model), **settings)
    monkeypatch.setattr(model_runner, "compiles_kernels_ahead", lambda device: True)
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


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "qwen3_moe"])
def test_the_compile_passes_run_one_layer_of_each_kind(family):
    """Each kind of layer launches its own kernel variants: the first layer (no residual to add yet), the second
    (the add fused into its norm), and the first sliding, full, dense or MoE layer after them."""
    from conftest import tiny_model
    from hf_minivllm.models.adapter import build_decoder

    many = dict(num_hidden_layers=8)
    if family == "gemma3":
        kinds = dict(layer_types=["sliding_attention"] * 5 + ["full_attention"] * 3)
    elif family == "qwen3_moe":
        kinds = dict(mlp_only_layers=[0, 1, 2])
    else:
        kinds = {}
    expected = {"qwen3": [0, 1], "gemma3": [0, 1, 5], "qwen3_moe": [0, 1, 3]}[family]
    assert build_decoder(tiny_model(family, **many, **kinds)).variant_layers() == expected


def test_only_layers_runs_those_layers_inside_the_block_and_all_after_it():
    from conftest import tiny_model
    from hf_minivllm.models.adapter import build_decoder

    decoder = build_decoder(tiny_model("qwen3", num_hidden_layers=4))
    ran = []
    for index, layer in enumerate(decoder.layers):  # stand-ins: a layer alone needs a runner step's attention inputs
        layer.forward = lambda positions, hidden, residual, index=index: ran.append(index) or (hidden, hidden)
    tokens, positions = torch.tensor([5, 6, 7]), torch.arange(3)
    with pytest.raises(KeyError):
        with decoder.only_layers([0, 2]):
            decoder(tokens, positions)
            raise KeyError("a failing pass")
    assert ran == [0, 2]
    ran.clear()
    decoder(tokens, positions)
    assert ran == [0, 1, 2, 3]


def test_the_runner_submits_the_slow_compiles_first_and_every_decode_bucket_without_waiting():
    """The warm-up's prefill kernel and the cascade kernel compile longest: they are submitted first; every graph
    bucket's decode pass follows at once (no wait for the compiles in between), through the variant layers only."""
    import contextlib
    from types import SimpleNamespace

    from hf_minivllm.engine import model_runner

    events = []

    @contextlib.contextmanager
    def only_layers(indices):
        events.append(("layers", indices))
        yield
        events.append(("all layers",))

    model = SimpleNamespace(only_layers=only_layers)
    for cascade, expected_cascade in ((False, []), (True, [("decode", [model_runner.CASCADE_MIN_SEQS, 64], True)])):
        events.clear()
        runner = SimpleNamespace(device=torch.device("cpu"), config=SimpleNamespace(max_num_seqs=64), model=model,
                                 variant_layers=[0, 1],
                                 _warm_up=lambda: events.append(("warm-up",)), _cascade=cascade,
                                 _decode_compile_passes=lambda buckets, cascade=False: events.append(
                                     ("decode", buckets, cascade)),
                                 _synchronize=lambda: None)
        model_runner.ModelRunner._compile_kernels_ahead(runner)
        assert events == [("layers", [0, 1]), ("warm-up",), *expected_cascade,
                          ("decode", [64, 48, 32, 16, 8, 4, 2, 1], False), ("all layers",)]


def test_each_launcher_is_built_once_per_signature_beside_the_compiles(monkeypatch):
    """Triton builds a compiled kernel's launcher (a C module) at its first launch, one after another; each pool job
    builds its kernel's right after the compile, once per list of argument types."""
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


def test_tensor_parallel_ranks_run_the_variant_layers_any_of_them_chose():
    """The passes and the warm-ups before captures run collectives layer by layer: a rank whose weights differ in
    alignment may choose another layer, and every rank must then run it too (ranks running apart would wait on
    each other for ever)."""
    from types import SimpleNamespace

    from hf_minivllm.engine import model_runner

    class OtherRankChoseLayer5:
        def all_reduce(self, votes):
            votes[5] += 1

    model = SimpleNamespace(variant_layers=lambda: [0, 1], num_layers=8)
    for group, expected in ((None, [0, 1]), (OtherRankChoseLayer5(), [0, 1, 5])):
        runner = SimpleNamespace(model=model, group=group, device=torch.device("cpu"))
        assert model_runner.ModelRunner._agreed_variant_layers(runner) == expected
