"""Compile, for a Hopper GPU and without one, the kernel variants that the CPU tests launch.

Triton's interpreter runs a kernel as Python, so it lets through what Triton's compiler refuses: a global that is not
a constexpr, an operation the target lacks, a constexpr branch the wrong type. A kernel that passes every CPU test
could still fail to compile on the GPU, where no engine starts without it. So each kernel test module records, while
its tests run under the interpreter, every launch's variant: the argument types Triton compiles for, its constexprs
and launch options (``recording_launches``). Its last test then compiles some of them for sm_90, as far as a cubin,
in a process without the interpreter (``compile_for_hopper``); Triton ships the ptxas that takes it there.

A compile takes about a second and the tests launch hundreds of variants (head sizes, block sizes, split counts and
the like), so only a covering few are compiled: per kernel, enough variants that each flag's value, each pointer's
dtype, each launch option's value, each integer constexpr's smallest and largest value and its being 1 (a value
Triton specializes), and each padded size's differing from its unpadded one or not, appear in at least one. The CPU tests run fp32 and fp16; a GPU runs bf16 models and the
sampler's hardware log, so each kernel also compiles one variant as a GPU launches it (``_as_on_a_gpu``). Not
covered: launch options only a GPU's wrapper sets (the FP8 decode kernel's register cap) and Triton's divisibility
specialization of pointers and sizes.
"""
from __future__ import annotations

import collections
import contextlib
import inspect
import json
import os
import subprocess
import sys
from typing import Any, Iterator

import pytest
import torch
import triton
import triton.language as tl

_TRITON_POINTER_TYPES = {
    torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float8_e4m3fn: "*fp8e4nv",
    torch.float8_e5m2: "*fp8e5", torch.int64: "*i64", torch.int32: "*i32", torch.int16: "*i16", torch.int8: "*i8",
    torch.uint8: "*u8", torch.bool: "*i1",
}
_INT32 = range(-2**31, 2**31)


def _constexpr_value(value: Any) -> Any:
    """A constexpr as JSON: Triton dtypes by name, the rest as they are."""
    if isinstance(value, tl.dtype):
        return {"triton_dtype": value.name}
    return value


def describe_launch(fn: Any, jit_options: dict, args: tuple, kwargs: dict) -> str:
    """One launch of the kernel ``fn`` (the Python function under ``triton.jit``) as a JSON key: Triton's signature
    for it, its constexprs and its launch options. Integers equal to 1 become constexprs, as Triton specializes them
    (unless ``do_not_specialize`` names them); other integers, floats and bools keep only their type."""
    parameters = inspect.signature(fn).parameters
    bound = dict(zip(parameters, args))
    bound.update({name: value for name, value in kwargs.items() if name in parameters})
    options = {name: value for name, value in kwargs.items() if name not in parameters}
    unspecialized = {parameter if isinstance(parameter, str) else list(parameters)[parameter]
                     for parameter in jit_options.get("do_not_specialize") or ()}
    signature, constexprs = {}, {}
    for name, parameter in parameters.items():
        value = bound.get(name, parameter.default)
        if value is inspect.Parameter.empty:
            raise TypeError(f"kernel {fn.__name__} launched without its argument {name!r}")
        if "constexpr" in str(parameter.annotation) or value is None:
            signature[name] = "constexpr"
            constexprs[name] = _constexpr_value(value)
        elif isinstance(value, torch.Tensor):
            if value.dtype not in _TRITON_POINTER_TYPES:
                raise TypeError(f"kernel {fn.__name__}: no Triton pointer type for {value.dtype} ({name!r})")
            signature[name] = _TRITON_POINTER_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1 and name not in unspecialized:
                signature[name], constexprs[name] = "constexpr", 1
            else:
                signature[name] = "i32" if value in _INT32 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"kernel {fn.__name__}: cannot describe argument {name!r} of type {type(value).__name__}")
    return json.dumps({"module": fn.__module__, "kernel": fn.__name__, "signature": signature,
                       "constexprs": constexprs, "options": options}, sort_keys=True)


@triton.jit
def _recording_probe_kernel(out_ptr):
    tl.store(out_ptr, 1)


@contextlib.contextmanager
def recording_launches() -> Iterator[set[str]]:
    """While the block runs, every interpreted kernel launch (and ``warmup``) also adds its variant to the set. A
    probe launch first checks that launches still pass through the method this patches: were the recording to miss
    them, the compile test would find nothing to compile and skip."""
    from triton.runtime.interpreter import InterpretedFunction

    launched: set[str] = set()
    interpreted_run = InterpretedFunction.run

    def run(self, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        launched.add(describe_launch(self.fn, self.kwargs, args, kwargs))
        return interpreted_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        _recording_probe_kernel[(1,)](torch.zeros(1, dtype=torch.int32))
        if not launched:
            raise RuntimeError("this Triton's interpreter launches kernels without InterpretedFunction.run: "
                               "tests/kernel_variants.py records nothing and needs updating")
        launched.clear()
        yield launched
    finally:
        InterpretedFunction.run = interpreted_run


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _features(variant: dict, extremes: dict[str, tuple[int, int]]) -> set[tuple[str, str]]:
    """What a covering set must show of a variant: its flags, pointer dtypes and launch options by value, its integer
    constexprs by being 1 and by being the smallest or largest of the kernel's (``extremes``)."""
    features = set()
    for name, value in variant["constexprs"].items():
        if not _is_integer(value):
            features.add((name, json.dumps(value)))
            continue
        smallest, largest = extremes[name]
        features.update((name, label) for label, holds in (("1", value == 1), ("smallest", value == smallest),
                                                            ("largest", value == largest)) if holds)
    # A NAME_PADDED beside NAME (attention's head size rounded up to a power of two) is a flag in all but name: the
    # kernel compiles its lane masks only when the two differ.
    features.update((f"{name} != {name}_PADDED", json.dumps(value != variant["constexprs"][f"{name}_PADDED"]))
                    for name, value in variant["constexprs"].items() if f"{name}_PADDED" in variant["constexprs"])
    features.update((name, kind) for name, kind in variant["signature"].items() if kind != "constexpr")
    features.update((name, json.dumps(value)) for name, value in variant["options"].items())
    return features


def _as_on_a_gpu(variant: dict) -> dict:
    """The variant as a GPU launches it: 16-bit pointers in bf16, the sampler's hardware log."""
    signature = {name: "*bf16" if kind == "*fp16" else kind for name, kind in variant["signature"].items()}
    constexprs = dict(variant["constexprs"])
    if "FAST_LOG" in constexprs:
        constexprs["FAST_LOG"] = True
    return {**variant, "signature": signature, "constexprs": constexprs}


def covering_variants(variants: set[str]) -> list[str]:
    """A few of ``variants`` (greedily chosen, per kernel) that between them show every feature of all of them, and
    per kernel one of those as a GPU launches it (from the chosen variant with the most fp16 pointers)."""
    by_kernel: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
    for key in sorted(variants):
        variant = json.loads(key)
        by_kernel[variant["module"], variant["kernel"]].append(variant)
    chosen = []
    for kernel_variants in by_kernel.values():
        extremes = {}
        for variant in kernel_variants:
            for name, value in variant["constexprs"].items():
                if _is_integer(value):
                    smallest, largest = extremes.get(name, (value, value))
                    extremes[name] = min(smallest, value), max(largest, value)
        features = [_features(variant, extremes) for variant in kernel_variants]
        missing = set().union(*features)
        picked = []
        while missing:
            best = max(range(len(kernel_variants)), key=lambda index: len(features[index] & missing))
            picked.append(kernel_variants[best])
            missing -= features[best]
        sixteen_bit = max(picked, key=lambda variant: list(variant["signature"].values()).count("*fp16"))
        on_a_gpu = _as_on_a_gpu(sixteen_bit)
        chosen += [json.dumps(variant, sort_keys=True) for variant in picked + [on_a_gpu] * (on_a_gpu not in picked)]
    return chosen


_COMPILE = """
import concurrent.futures, importlib, json, os, sys, traceback
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget


def compile_variant(variant):
    kernel = getattr(importlib.import_module(variant["module"]), variant["kernel"])
    constexprs = {name: tl.dtype(value["triton_dtype"]) if isinstance(value, dict) else value
                  for name, value in variant["constexprs"].items()}
    try:
        source = triton.compiler.ASTSource(fn=kernel, signature=variant["signature"], constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=variant["options"])
        assert compiled.asm["cubin"], "no cubin"
    except Exception:
        return {"variant": variant, "error": traceback.format_exc()[-2500:]}


variants = [json.loads(line) for line in sys.stdin.read().splitlines()]
for module in {variant["module"] for variant in variants}:  # imported here: imports from threads can deadlock
    importlib.import_module(module)
# Triton's compiler leaves the GIL for most of its work.
with concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
    results = list(pool.map(compile_variant, variants))
print(json.dumps([failure for failure in results if failure]))
"""


def compile_for_hopper(variants: set[str] | None) -> None:
    """Compile a covering few of ``variants`` (None: not recorded in this process) for sm_90 in a process without
    ``TRITON_INTERPRET``; fails listing those that do not compile."""
    if variants is None:
        pytest.skip("the kernels compile for real here (a GPU), or this module's tests run in a fresh process")
    if not variants:
        pytest.skip("the tests selected in this module launched no kernel")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE], input="\n".join(covering_variants(variants)), env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failures, "\n\n".join(f"{failure['variant']}\n{failure['error']}" for failure in failures)
