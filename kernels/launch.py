"""Kernel launches that can be turned into compiles, so that start-up compiles every kernel at once.

Triton compiles a kernel variant on its first launch, one after another: with an empty Triton cache that was most of
an engine's start (7.5 of 13 s for the 0.6B architecture on an H200). Inside ``compile_ahead()`` the launches of
this package's kernels only submit their compiles to a thread pool (Triton's asynchronous compile mode; its
compiler leaves the GIL for most of the work) and leaving the block waits for all of them, so the variants a pass
launches compile in about the time of the slowest, each followed on its thread by its launcher (a small C module
Triton would otherwise build at the kernel's first launch). A pass run inside the block computes nothing its caller
may read: the kernels' outputs are never written.

The state is a context variable: another thread's launches, and another engine's, are untouched.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import torch

try:  # Triton 3.6 has it
    from triton.runtime import _async_compile
    from triton.runtime._async_compile import AsyncCompileMode
except ImportError:  # pragma: no cover - older Triton: launches compile one at a time, as before
    AsyncCompileMode = None

# Inside compile_ahead(): the variants submitted so far (see _variant); None outside.
_SUBMITTED: contextvars.ContextVar[set | None] = contextvars.ContextVar("hf_minivllm_compiling_ahead", default=None)
MAX_COMPILE_THREADS = 16
logger = logging.getLogger(__name__)


def _specialization(value: Any) -> Any:
    """What Triton compiles a separate variant for: a tensor's dtype and 16-byte alignment, an integer being 1 or
    a multiple of 16, a float's type; anything else (strings, None) as it is."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value == 1, value % 16 == 0
    if isinstance(value, float):
        return float
    return value


def _variant(kernel: Any, args: tuple, kwargs: dict) -> tuple:
    """An approximation of Triton's own cache key that costs microseconds. The passes launch each variant hundreds
    of times, and under the asynchronous mode each launch of a not yet finished variant recomputes Triton's key:
    without this, the passes took 4.9 s with a warm Triton cache (H200, commit b093ba7). Keyword arguments, which
    carry our constexprs and launch options, count by value. Where it errs, a variant is submitted twice (Triton
    merges them) or compiles at its first launch as before: never a wrong kernel."""
    return (kernel, tuple(_specialization(value) for value in args),
            tuple((name, value if not isinstance(value, torch.Tensor) else _specialization(value))
                  for name, value in kwargs.items()))


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``; inside ``compile_ahead()``, only the kernel's compile (nothing runs)."""
    submitted = _SUBMITTED.get()
    if submitted is None:
        kernel[grid](*args, **kwargs)
        return
    try:
        variant = _variant(kernel, args, kwargs)
        if variant in submitted:
            return
        submitted.add(variant)
    except TypeError:  # an argument that cannot be hashed: submit it (Triton merges repeats)
        pass
    kernel.warmup(*args, grid=grid, **kwargs)


def can_compile_ahead() -> bool:
    """Whether this Triton can compile concurrently (``compile_ahead`` would otherwise run its pass for nothing)."""
    return AsyncCompileMode is not None


def _launcher_key(kernel: Any) -> str:
    """What a compiled kernel's launcher source depends on: its argument types in order (constexprs appear there
    as "constexpr") and its tensor descriptors."""
    return repr((tuple(kernel.src.signature.values()), getattr(kernel.metadata, "tensordesc_meta", None)))


class CompilePool(ThreadPoolExecutor):
    """The compile threads. Each job builds its kernel's launcher right after the compile (see ``_build_launcher``),
    so that the launchers' C compiles overlap the other kernels' compiles instead of following them all."""

    def __init__(self, max_workers: int):
        super().__init__(max_workers, thread_name_prefix="hf-minivllm-compile")
        self._lock = threading.Lock()
        self._launchers: set[str] = set()

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        def compile_and_build() -> Any:
            kernel = fn(*args, **kwargs)
            self._build_launcher(kernel)
            return kernel

        return super().submit(compile_and_build)

    def _build_launcher(self, kernel: Any) -> None:
        """Build a compiled kernel's launcher into Triton's cache, once per list of argument types. Triton builds a
        kernel's launcher (a small C module, through the host's C compiler) at the kernel's first launch, one after
        another: that took 1.9 s of an empty-cache start (0.6B architecture, H200, 2699d40). Built here, the first
        launches load them from the cache."""
        if not (hasattr(kernel, "src") and hasattr(kernel, "metadata")):
            return
        try:
            key = _launcher_key(kernel)
            with self._lock:
                if key in self._launchers:
                    return
                self._launchers.add(key)
            from triton.runtime.driver import driver

            driver.active.launcher_cls(kernel.src, kernel.metadata)
        except Exception:  # a Triton whose internals differ: the kernel builds its launcher at its first launch
            logger.debug("building a Triton launcher ahead failed; it builds at first launch", exc_info=True)


def _hash_triton_ahead() -> None:
    """Start Triton's hash of its own files (about 0.4 s, once per process) on a thread of its own. The first compile
    needs it before it can go to the pool. With an empty Triton cache, Triton first builds its driver module (about
    0.5 s) before that request, and the hash is done by then; from a warm cache the two may race, and both hash
    (``lru_cache`` does not merge first calls), which costs no more than before."""
    try:
        from triton.runtime.cache import triton_key
    except ImportError:  # pragma: no cover - a Triton without it: the first compile hashes, as before
        return
    if triton_key.cache_info().currsize:
        return

    def hash_quietly() -> None:
        try:
            triton_key()
        except Exception:  # noqa: BLE001 - the first compile computes it again and raises there
            logger.debug("hashing Triton ahead failed", exc_info=True)

    threading.Thread(target=hash_quietly, name="hf-minivllm-triton-key", daemon=True).start()


@contextlib.contextmanager
def compile_ahead(max_threads: int | None = None) -> Iterator[CompilePool]:
    """Turn this thread's launches into concurrent compiles until the block ends, then wait for them all and for
    their launchers (a compile error is raised here)."""
    if AsyncCompileMode is None:
        raise RuntimeError("compile_ahead needs Triton's asynchronous compile mode (Triton 3.6 has it)")
    threads = max_threads or min(MAX_COMPILE_THREADS, os.cpu_count() or 1)
    _hash_triton_ahead()
    with CompilePool(threads) as pool:
        try:
            with AsyncCompileMode(pool):
                token = _SUBMITTED.set(set())
                try:
                    yield pool
                finally:
                    _SUBMITTED.reset(token)
        finally:
            # Triton 3.6 leaves its mode active when a compile fails; this thread's later compiles (a retry, another
            # engine) would then go to the closed pool.
            _async_compile.active_mode.set(None)
