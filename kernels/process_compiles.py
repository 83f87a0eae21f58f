"""Triton compiles in forked processes, so that start-up's concurrent compiles stop contending for one interpreter.

Under ``compile_ahead`` (``hf_minivllm.kernels.launch``) the variants compile on a thread pool, but each one holds
the GIL for much of its work: fourteen variants that take 0.2-0.4 s alone took about 3 s each together, and the
pass 5.6-6.5 s of an empty-cache start (0.6B architecture, H200, commit 6c587f3). Here each variant first compiles in
a worker process, forked from the engine's (the kernel modules are already imported there), into Triton's on-disk
cache; the thread pool's in-process compile then reads it back from that cache.

A forked child must not touch CUDA, so it is handed everything a compile needs, the target included, and builds
the kernel's launcher (a C module) without loading anything on the device. A worker that fails or hangs costs
nothing but time: the in-process compile after it compiles the variant itself.

Triton announces each compile through its process-wide ``jit_cache_hook``; ``install_hook`` puts a dispatcher there
that acts only inside ``ProcessCompiles.active()`` of the calling context (the engine's thread), so other threads'
compiles, and other engines', are untouched.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import importlib
import json
import logging
import multiprocessing
import os
import threading
import time
import warnings
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Iterator

logger = logging.getLogger(__name__)

# The pool of the block being run in this context, and the job just submitted for the compile Triton is about to
# hand to the thread pool (see ``take_pending``).
_ACTIVE: contextvars.ContextVar[ProcessCompiles | None] = contextvars.ContextVar("hf_minivllm_process_compiles",
                                                                                 default=None)
_PENDING: contextvars.ContextVar[Future | None] = contextvars.ContextVar("hf_minivllm_process_compile_job",
                                                                        default=None)
_HOOK_LOCK = threading.Lock()
# How long a compile waits for its worker before compiling in-process regardless.
WORKER_TIMEOUT_S = 120.0


def compile_in_worker(job: dict) -> float:
    """A worker's job: compile one variant for ``job["target"]`` into Triton's cache and build its launcher;
    returns the seconds it took (a variant already in the cache: milliseconds)."""
    import triton
    from triton.compiler import ASTSource

    start = time.perf_counter()
    kernel_function = getattr(importlib.import_module(job["module"]), job["name"])
    source = ASTSource(kernel_function, job["signature"], job["constants"], job["attrs"])
    kernel = triton.compile(source, target=job["target"], options=job["options"])
    try:
        from triton.runtime.driver import driver

        driver.active.launcher_cls(kernel.src, kernel.metadata)
    except Exception:  # noqa: BLE001 - the launcher then builds in the engine's process, as without workers
        logger.debug("building a launcher in a compile worker failed", exc_info=True)
    return time.perf_counter() - start


def _job(fn: Any, compile: dict, target: Any) -> dict | None:
    """What a worker needs to compile the variant Triton's hook announces; None for a kernel it cannot import."""
    name, module = fn.name, fn.module
    module = module if isinstance(module, str) else getattr(module, "__name__", None)
    if module is None or "." in name or "<" in name:  # nested or local functions cannot be found by name
        return None
    options = json.loads(compile["specialization_data"])["options"]
    options = {key: tuple(value) if isinstance(value, list) else value for key, value in options.items()}
    return dict(module=module, name=name, signature=compile["signature"], constants=compile["constants"],
                attrs=compile["configs"][0], options=options, target=target)


class ProcessCompiles:
    """The worker processes of one ``compile_ahead`` block; forked on its first compile, gone when it ends."""

    def __init__(self, max_workers: int):
        self.max_workers = max_workers
        self._executor: ProcessPoolExecutor | None = None
        self._target: Any = None

    def submit(self, fn: Any, compile: dict) -> Future | None:
        job = _job(fn, compile, self._current_target())
        if job is None:
            return None
        if self._executor is None:
            self._executor = ProcessPoolExecutor(self.max_workers, mp_context=multiprocessing.get_context("fork"))
        with warnings.catch_warnings():  # Python 3.12+ warns about forking a threaded process: the child runs no
            warnings.simplefilter("ignore", DeprecationWarning)  # thread of ours and never touches CUDA
            return self._executor.submit(compile_in_worker, job)

    def _current_target(self) -> Any:
        if self._target is None:
            from triton.runtime.driver import driver

            self._target = driver.active.get_current_target()
        return self._target

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    @contextlib.contextmanager
    def active(self) -> Iterator[ProcessCompiles]:
        """Send this context's compiles to the workers until the block ends."""
        install_hook()
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)
            _PENDING.set(None)
            self.close()


def take_pending() -> Future | None:
    """The worker job of the compile being submitted now in this context (once), if any."""
    job = _PENDING.get()
    _PENDING.set(None)
    return job


def wait_for(job: Future | None) -> float:
    """Wait for a worker job; the seconds its compile took (0 when it failed, timed out, or there was none: the
    in-process compile that follows then does the work)."""
    if job is None:
        return 0.0
    try:
        return job.result(timeout=WORKER_TIMEOUT_S)
    except concurrent.futures.TimeoutError:
        logger.warning("a kernel compile worker took over %.0f s; compiling in-process instead", WORKER_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - a broken worker: the in-process compile reports any real error
        logger.debug("a kernel compile worker failed; compiling in-process instead", exc_info=True)
    return 0.0


def install_hook() -> None:
    """Put the dispatcher on Triton's ``jit_cache_hook`` once, keeping a hook set before it."""
    from triton import knobs

    with _HOOK_LOCK:
        previous = knobs.runtime.jit_cache_hook
        if getattr(previous, "_hf_minivllm_dispatcher", False):
            return

        def dispatch(*args: Any, **kwargs: Any) -> Any:
            pool = _ACTIVE.get()
            if pool is not None:
                try:
                    _PENDING.set(pool.submit(kwargs["fn"], kwargs["compile"]))
                except Exception:  # noqa: BLE001 - a Triton whose hook differs: compile in-process as before
                    logger.debug("handing a compile to a worker failed", exc_info=True)
            return previous(*args, **kwargs) if previous is not None else None

        dispatch._hf_minivllm_dispatcher = True
        knobs.runtime.jit_cache_hook = dispatch


def default_workers() -> int:
    """Worker processes per ``compile_ahead`` block: ``HF_MINIVLLM_COMPILE_WORKERS`` (0: none, every compile
    in-process), else one per CPU, at most 16."""
    setting = os.environ.get("HF_MINIVLLM_COMPILE_WORKERS")
    if setting is not None:
        try:
            return max(0, int(setting))
        except ValueError:
            raise ValueError(f"HF_MINIVLLM_COMPILE_WORKERS must be a whole number, got {setting!r}") from None
    return min(16, os.cpu_count() or 1)
