"""Shared fixtures: tiny random-init models of each supported family, and the embedded SmolLM2 (GGUF)."""
from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# The tests run many small ops: one thread is as fast, and immune to the OpenMP spin-wait stalls (up to 20x) that
# two threads suffer on a CPU shared with other jobs.
torch.set_num_threads(1)

if not torch.cuda.is_available():
    # Triton picks interpreter or compiler at its first import (transformers imports it early): without a GPU,
    # choose the interpreter before anything does, so the kernel tests run in this process.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _triton_interpreted() -> bool:
    """Whether triton (already imported or imported now) runs kernels under its interpreter in this process."""
    from triton.runtime.interpreter import InterpretedFunction
    import triton.language as tl

    return isinstance(tl.standard.sum, InterpretedFunction)


# Whether Triton kernels can run in this process: compiled on a GPU, or interpreted on the CPU.
KERNELS_RUN_HERE = torch.cuda.is_available() or _triton_interpreted()



def import_kernel_module(name: str):
    """``hf_minivllm.kernels.<name>``, compiled on a GPU or interpreted on CPU; skips when neither can run here."""
    if not KERNELS_RUN_HERE:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set: "
                    "test_interpreter_tests_in_a_fresh_process runs these")
    return importlib.import_module(f"hf_minivllm.kernels.{name}")


@pytest.fixture(scope="module")
def launched_kernel_variants():
    """The kernel variants that this module's tests launch under the interpreter in this process (None where they
    do not run interpreted here), for its last test to compile for a GPU (see ``kernel_variants``)."""
    if not _triton_interpreted():
        yield None
        return
    from kernel_variants import recording_launches

    with recording_launches() as launched:
        yield launched


def run_under_interpreter(*test_files: Path) -> None:
    """Run kernel test files in a fresh pytest process with TRITON_INTERPRET=1 (skipped when this one can)."""
    if KERNELS_RUN_HERE:
        pytest.skip("the kernels run in this process")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *map(str, test_files)],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


# Qwen3-MoE is served with transformers 5's stacked experts (4.x keeps one module per expert: HF's generate).
_TRANSFORMERS_MAJOR = int(importlib.metadata.version("transformers").split(".")[0])
FAMILIES = ("qwen3", "qwen2", "llama", "mistral", "phi3", "gemma2", "gemma3") + (
    ("qwen3_moe",) if _TRANSFORMERS_MAJOR >= 5 else ())
# A KV cache small enough that tests exercise many blocks (and preemption when asked for).
SMALL_ENGINE = dict(num_kvcache_blocks=256, kvcache_block_size=4)

# The benchmark workloads (benchmarks/workloads.py) double as the GPU tests' model builders.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def tiny_config(family: str, **overrides):
    """A small random-init config of the given family (head_dim 16, GQA 4:2, 2 layers; qwen3_moe: 3 layers, the
    middle one dense, 8 experts, top-2).

    Gemma 2 and 3: one sliding layer with an 8-token window (the tests' prompts are longer) and one full layer;
    an attention scale not head_dim's; Gemma 2's soft-caps small enough to bite, under HF's eager attention (its
    sdpa attention drops the attention soft-cap); Gemma 3's full layers on their own (linear-scaled) RoPE table.
    """
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config,
                              Qwen3Config, Qwen3MoeConfig)

    common = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    classes = {"qwen3": Qwen3Config, "qwen2": Qwen2Config, "llama": LlamaConfig, "mistral": MistralConfig,
               "phi3": Phi3Config, "gemma2": Gemma2Config, "gemma3": Gemma3TextConfig, "qwen3_moe": Qwen3MoeConfig}
    if family == "qwen3":
        common.update(head_dim=16, tie_word_embeddings=True)
    if family == "qwen3_moe":
        common.update(head_dim=16, num_hidden_layers=3, mlp_only_layers=[1], num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=32, norm_topk_prob=True)
    if family in ("mistral", "phi3"):
        common.update(sliding_window=None)
    if family in ("gemma2", "gemma3"):
        common.update(head_dim=16, tie_word_embeddings=True, sliding_window=8, query_pre_attn_scalar=32,
                      layer_types=["sliding_attention", "full_attention"])
    if family == "gemma2":
        common.update(attn_logit_softcapping=1.0, final_logit_softcapping=2.0, attn_implementation="eager")
    if family == "gemma3":
        # The full layers' scaling (transformers 5 moves it into rope_parameters["full_attention"]).
        common.update(rope_scaling={"rope_type": "linear", "factor": 2.0})
    common.update(overrides)
    return classes[family](**common)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random-init causal LM with weights scaled up so that greedy decoding is not a flat distribution (MoE
    routers and stacked experts too, so routing is never a tie)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.08)
            elif family.startswith("gemma") and name.endswith("norm.weight"):
                param.normal_(0.0, 0.3)  # Gemma's norms start at 0 (a scale of 1): tell the four apart
    return model.eval()


class ScaledLayer(torch.nn.Module):
    """A module wrapped around a layer (as adapters and quantizers wrap them): the engine cannot serve it."""

    def __init__(self, inner: torch.nn.Module, factor: float):
        super().__init__()
        self.inner = inner
        self.factor = factor

    def forward(self, x):
        return self.factor * self.inner(x)


def shared_prefix_prompts(count: int, prefix_len: int, seed: int = 0, max_own: int = 20) -> list[list[int]]:
    """``count`` prompts that start with the same ``prefix_len`` tokens, then 1 to ``max_own - 1`` of their own
    (prefix caching shares the prefix's pages: what cascade attention reads once per tile)."""
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, 320, (prefix_len,), generator=generator).tolist()
    return [prefix + torch.randint(3, 320, (int(n),), generator=generator).tolist()
            for n in torch.randint(1, max_own, (count,), generator=generator)]


def left_padded_batch(seed=1, lengths=(12, 7, 10, 3), vocab=320, pad=0):
    """Random token rows of the given lengths, left-padded with ``pad``, and their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, vocab, (n,), generator=generator)
        mask[row, width - n :] = 1
    return ids, mask


@contextlib.contextmanager
def _gguf_parsed_once():
    """Transformers parses the GGUF file anew for the config, the tokenizer and the weights (four readers, each
    decoding all of its metadata: vocabulary and merges) and rebuilds gguf's tensor-name table once per layer: about
    35 s of one CI core per load. Within one load the file and the tables do not change, so share them, and the three
    calls that want the metadata alone share one decoding (each gets its own copy); the weights and tokenizer come out
    the same."""
    import gguf
    from transformers import modeling_gguf_pytorch_utils

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    load = modeling_gguf_pytorch_utils.load_gguf_checkpoint
    metadata = functools.lru_cache(maxsize=2)(lambda path: load(path, return_tensors=False))

    def load_once(path, return_tensors=False, **kwargs):
        return load(path, return_tensors=True, **kwargs) if return_tensors else copy.deepcopy(metadata(path))

    def rebind(old, new):  # transformers' modules import the function by name
        for module in list(sys.modules.values()):
            if getattr(module, "__dict__", {}).get("load_gguf_checkpoint") is old:
                module.load_gguf_checkpoint = new

    gguf.GGUFReader = functools.lru_cache(maxsize=2)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(name_map)
    rebind(load, load_once)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
        rebind(load_once, load)


# A folder the pytest-xdist workers of one run share (set by the controlling process, inherited by the workers).
_SHARED_DIR_VARIABLE = "HF_MINIVLLM_TEST_SHARED_DIR"


def pytest_configure(config):
    """Under pytest-xdist, give the run's workers a folder to share the embedded model through (see _smollm2)."""
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return
    config._hf_minivllm_shared_dir = tempfile.mkdtemp(prefix="hf-minivllm-tests-")
    os.environ[_SHARED_DIR_VARIABLE] = config._hf_minivllm_shared_dir


def pytest_unconfigure(config):
    shared = getattr(config, "_hf_minivllm_shared_dir", None)
    if shared is not None:
        shutil.rmtree(shared, ignore_errors=True)
        os.environ.pop(_SHARED_DIR_VARIABLE, None)


@functools.lru_cache(maxsize=1)
def _smollm2():
    """The embedded model and tokenizer, parsed from the GGUF file once per run: the first worker to need them
    parses the file (about 15 s of a CI core) and leaves a pickled copy that the other worker loads in a second."""
    from hf_minivllm.models.loading import load_embedded_model

    shared = os.environ.get(_SHARED_DIR_VARIABLE)
    if shared is None or not os.path.isdir(shared):
        with _gguf_parsed_once():
            return load_embedded_model()
    copy_path = Path(shared) / "smollm2.pt"
    with open(Path(shared) / "smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits here while the first one parses
        if copy_path.exists():
            return torch.load(copy_path, weights_only=False)
        with _gguf_parsed_once():
            loaded = load_embedded_model()
        torch.save(loaded, copy_path.with_suffix(".partial"))
        os.replace(copy_path.with_suffix(".partial"), copy_path)
        return loaded


@pytest.fixture
def smollm2():
    """(fresh deep copy of SmolLM2-135M-Instruct in fp32, its tokenizer); loaded once per session."""
    model, tokenizer = _smollm2()
    return copy.deepcopy(model), tokenizer
