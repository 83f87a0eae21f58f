"""The benchmark workloads of DESIGN.md section 3, built the same way in every script so results compare."""
from __future__ import annotations

import json
import os
import random
import subprocess
import time

import torch

from hf_minivllm import SamplingParams


def w1_requests(num_seqs: int = 256, max_input_len: int = 1024, max_output_len: int = 1024):
    """nano-vllm's benchmark exactly: prompts first, then sampling params, from random.seed(0)."""
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, max_input_len))] for _ in range(num_seqs)]
    params = [
        SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=random.randint(100, max_output_len))
        for _ in range(num_seqs)
    ]
    return prompts, params


def left_padded(prompts: list[list[int]], device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as one left-padded batch (input_ids, attention_mask), as HF code hands them to ``generate``."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def leading_rows(ids: torch.Tensor, mask: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's first ``rows`` rows without the padding columns all of them share (HF's subset peers)."""
    ids, mask = ids[:rows], mask[:rows]
    keep = int(mask.sum(0).nonzero()[0])
    return ids[:, keep:], mask[:, keep:]


def w3_requests(num_seqs: int = 256, prefix_len: int = 2048, own_len: int = 128, new_tokens: int = 128,
                own_seed: int = 0):
    """W3 (DESIGN.md section 3): one shared prefix, then each request's own tokens; sampled at T=0.6, eos ignored.
    ``own_seed`` other than 0: the same prefix with other own tokens (a warm-up of W3's shape)."""
    random.seed(0)
    prefix = [random.randint(0, 10000) for _ in range(prefix_len)]
    if own_seed:
        random.seed(own_seed)
    prompts = [prefix + [random.randint(0, 10000) for _ in range(own_len)] for _ in range(num_seqs)]
    return prompts, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=new_tokens)


def qwen3_config(size: str = "0.6b"):
    """Qwen3-0.6B, Qwen3-8B or Qwen3-32B architecture (random init is enough for speed)."""
    from transformers import Qwen3Config

    common = dict(vocab_size=151936, max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                  head_dim=128, num_key_value_heads=8, bos_token_id=151643, eos_token_id=151645)
    if size == "0.6b":
        return Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                           tie_word_embeddings=True, **common)
    if size == "8b":
        return Qwen3Config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                           tie_word_embeddings=False, **common)
    if size == "32b":
        return Qwen3Config(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                           tie_word_embeddings=False, **common)
    raise ValueError(f"size must be '0.6b', '8b' or '32b', got {size!r}")


def random_model(size: str = "0.6b", dtype=torch.bfloat16, device: str = "cuda", seed: int = 0):
    """A random-init Qwen3 of the given size, built directly on the device."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(qwen3_config(size), dtype=dtype)
    return model.eval()


def timed(fn):
    """(fn(), wall seconds it took)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def commit() -> str:
    """The commit measured: $HF_MINIVLLM_COMMIT when set (machines that get the tree without .git), else git's."""
    if os.environ.get("HF_MINIVLLM_COMMIT"):
        return os.environ["HF_MINIVLLM_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def write_results(path: str | None, **fields) -> None:
    """Write ``fields`` with the commit measured to ``path`` as JSON; nothing when no path (--out) was given."""
    if path:
        with open(path, "w") as f:
            json.dump({"commit": commit(), **fields}, f, indent=2)
