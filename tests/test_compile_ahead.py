"""Start-up's concurrent compiles: inside ``compile_ahead`` a launch only compiles, in that thread alone.

The compiles themselves need a GPU (the engine runs them on CUDA only): the GPU tests check that nothing compiles
after start-up and that the answers stay token-exact."""
import threading

import pytest

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
