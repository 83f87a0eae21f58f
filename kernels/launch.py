"""Kernel launches that can be turned into compiles, so that start-up compiles every kernel at once.

Triton compiles a kernel variant on its first launch, one after another: with an empty Triton cache that was most of
an engine's start (7.5 of 13 s for the 0.6B architecture on an H200). Inside ``compile_ahead()`` the launches of
this package's kernels only submit their compiles to a thread pool (Triton's asynchronous compile mode; its
compiler leaves the GIL for most of the work) and leaving the block waits for all of them, so the variants a pass
launches compile in about the time of the slowest. A pass run inside the block computes nothing its caller may
read: the kernels' outputs are never written.

The state is a context variable: another thread's launches, and another engine's, are untouched.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

try:  # Triton 3.6 has it
    from triton.runtime._async_compile import AsyncCompileMode
except ImportError:  # pragma: no cover - older Triton: launches compile one at a time, as before
    AsyncCompileMode = None

_COMPILING_AHEAD: contextvars.ContextVar[bool] = contextvars.ContextVar("hf_minivllm_compiling_ahead", default=False)
MAX_COMPILE_THREADS = 16


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``; inside ``compile_ahead()``, only the kernel's compile (nothing runs)."""
    if _COMPILING_AHEAD.get():
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def can_compile_ahead() -> bool:
    """Whether this Triton can compile concurrently (``compile_ahead`` would otherwise run its pass for nothing)."""
    return AsyncCompileMode is not None


@contextlib.contextmanager
def compile_ahead(max_threads: int | None = None) -> Iterator[None]:
    """Turn this thread's launches into concurrent compiles until the block ends, then wait for them all (a
    compile error is raised here)."""
    if AsyncCompileMode is None:
        raise RuntimeError("compile_ahead needs Triton's asynchronous compile mode (Triton 3.6 has it)")
    threads = max_threads or min(MAX_COMPILE_THREADS, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads, thread_name_prefix="hf-minivllm-compile") as pool, AsyncCompileMode(pool):
        token = _COMPILING_AHEAD.set(True)
        try:
            yield
        finally:
            _COMPILING_AHEAD.reset(token)
