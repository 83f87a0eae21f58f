"""Teacher-forced top-1 agreement in bf16 on the Qwen3-0.6B architecture: ours against HF, and HF against itself, to
tell our rounding differences from the noise floor.

For 4 x 500 tokens: top-1 of HF bf16 (sdpa, its default), HF bf16 eager attention, HF fp32 (the rounding-free
reference), and our engine's prefill forward in bf16 with the Triton and the torch attention backend. Prints every
pair's agreement and, where ours and HF bf16 disagree, how far apart the two tokens' logits are in HF's own scores.

A random-init model's logits are nearly flat, so bf16 rounding alone flips several percent of its top-1s (HF's own
paths disagree that often). ``--train-steps N`` first trains the model for N steps as a byte-level language model on
this machine's Python standard library sources (no download; the only text every machine has), so its predictions
are as decisive as a trained model's, then scores 4 x 500 bytes of held-out files.
"""
from __future__ import annotations

import argparse
import copy
import math
import sysconfig
import time
import zlib
from pathlib import Path

import torch

from hf_minivllm import LLM
from hf_minivllm.layers.context import AttentionMetadata, set_attention_metadata
from workloads import commit, random_model


def engine_logits(llm: LLM, tokens: torch.Tensor) -> torch.Tensor:
    """Our decoder's logits for every position of one prompt (a single prefill over a fresh cache)."""
    length, device = len(tokens), llm.engine.runner.device
    table = list(range((length + llm.engine.runner.block_size - 1) // llm.engine.runner.block_size))
    metadata = AttentionMetadata(
        is_prefill=True,
        slot_mapping=torch.arange(length, device=device),
        block_tables=torch.tensor([table], dtype=torch.int32, device=device),
        cu_seqlens_q=torch.tensor([0, length], dtype=torch.int32, device=device),
        cu_seqlens_k=torch.tensor([0, length], dtype=torch.int32, device=device),
        max_seqlen_q=length,
        max_seqlen_k=length,
    )
    set_attention_metadata(metadata)
    try:
        with torch.inference_mode():
            hidden = llm.model(tokens.to(device), torch.arange(length, device=device))
            return llm.model.compute_logits(hidden).float()
    finally:
        set_attention_metadata(None)


def stdlib_bytes(held_out: bool) -> torch.Tensor:
    """All Python standard library sources as one byte tensor: files whose name hashes to 0 mod 10 are held out."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    chosen = [f for f in files if (zlib.crc32(str(f.name).encode()) % 10 == 0) == held_out]
    data = b"".join(f.read_bytes() for f in chosen)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def train_byte_lm(model, steps: int, batch: int = 16, length: int = 512, lr: float = 6e-4):
    """Train ``model`` in place (float32 weights, bf16 autocast, AdamW, warm-up then cosine decay); back in bf16."""
    data = stdlib_bytes(held_out=False)
    model.float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0))))
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(steps):
        offsets = torch.randint(0, len(data) - length, (batch,), generator=generator)
        tokens = torch.stack([data[o:o + length] for o in offsets.tolist()]).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"train step {step}: loss {loss.item():.3f} nats/byte, {time.perf_counter() - start:.0f} s")
    del optimizer
    return model.to(torch.bfloat16).eval()


def sample_texts(held_out: torch.Tensor | None, count: int = 4, length: int = 500) -> list[torch.Tensor]:
    """``count`` token sequences: random ids (for a random-init model) or stretches of ``held_out`` text."""
    generator = torch.Generator().manual_seed(3)
    if held_out is None:
        return [torch.randint(0, 10000, (length,), generator=generator) for _ in range(count)]
    offsets = [int(torch.randint(0, len(held_out) - length, (1,), generator=generator)) for _ in range(count)]
    return [held_out[offset:offset + length] for offset in offsets]


def teacher_forced_top1(model, texts: list[torch.Tensor], backends: tuple[str, ...] = ("triton", "torch"),
                        fp8_kv_cache: bool = False) -> tuple[dict[str, float], list[float]]:
    """Top-1 agreement (texts up to 1,024 tokens) of every pair among HF bf16 (sdpa), HF bf16 eager, HF fp32 and ours
    per attention backend (and, with ``fp8_kv_cache``, ours on the first backend with an FP8 KV cache,
    ``ours_<backend>_fp8``), over all positions of ``texts``; and, where ours (first backend) and HF bf16 disagree,
    HF's logit gap between the two tokens in units of its logits' std."""
    device = next(model.parameters()).device
    hf_eager = copy.deepcopy(model)
    hf_eager.set_attn_implementation("eager")
    hf_models = {"hf_bf16": model, "hf_bf16_eager": hf_eager, "hf_fp32": copy.deepcopy(model).float()}
    ours = {f"ours_{backend}": LLM(copy.deepcopy(model), max_model_len=1024, enforce_eager=True, num_kvcache_blocks=64,
                                   attention_backend=backend) for backend in backends}
    if fp8_kv_cache:
        ours[f"ours_{backends[0]}_fp8"] = LLM(copy.deepcopy(model), max_model_len=1024, enforce_eager=True,
                                              num_kvcache_blocks=64, attention_backend=backends[0], kv_cache_dtype="fp8")
    first_ours = f"ours_{backends[0]}"
    top1: dict[str, list[torch.Tensor]] = {}
    gaps: list[float] = []
    for tokens in texts:
        with torch.no_grad():
            rows = {name: hf(tokens[None].to(device)).logits[0].float() for name, hf in hf_models.items()}
        rows.update({name: engine_logits(llm, tokens) for name, llm in ours.items()})
        for name, logits in rows.items():
            top1.setdefault(name, []).append(logits.argmax(-1))
        hf_logits, ours_top1 = rows["hf_bf16"], rows[first_ours].argmax(-1, keepdim=True)
        differ = ours_top1[:, 0] != hf_logits.argmax(-1)
        gap = hf_logits.max(-1).values - hf_logits.gather(-1, ours_top1)[:, 0]
        gaps += (gap[differ] / hf_logits.std(-1)[differ]).tolist()
    top1 = {name: torch.cat(values) for name, values in top1.items()}
    names = list(top1)
    table = {f"{a} vs {b}": float((top1[a] == top1[b]).float().mean()) for i, a in enumerate(names) for b in names[i + 1:]}
    return table, gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out")
    parser.add_argument("--train-steps", type=int, default=0,
                        help="train as a byte-level LM on the standard library first (0: score the random init)")
    parser.add_argument("--fp8-kv-cache", action="store_true", help="also ours with an FP8 KV cache")
    args = parser.parse_args()
    model = random_model("0.6b")
    held_out = None
    if args.train_steps:
        model = train_byte_lm(model, args.train_steps)
        held_out = stdlib_bytes(held_out=True)
    texts = sample_texts(held_out)
    table, gaps = teacher_forced_top1(model, texts, fp8_kv_cache=args.fp8_kv_cache)
    weights = f"trained {args.train_steps} steps (byte LM), held-out text" if args.train_steps else "random init"
    print(f"{torch.cuda.get_device_name()}, commit {commit()}, {weights}, {sum(map(len, texts))} positions")
    for pair, value in table.items():
        print(f"   {pair:34s} {value:.4f}")
    print(f"ours_triton vs hf_bf16 disagreements: {len(gaps)}; HF's logit gap between the two tokens, in units of "
          f"its logits' std: max {max(gaps, default=0):.4f}, median {sorted(gaps)[len(gaps) // 2] if gaps else 0:.4f}")
    from results import finish_run

    summary = {"device": torch.cuda.get_device_name(), "commit": commit(), "weights": weights,
               "positions": sum(map(len, texts)), "agreement": table, "gaps_in_std": gaps}
    finish_run(args.out, summary, figures(summary), "bf16_agreement")


def figures(result: dict) -> list:
    """Ours (Triton attention) against HF fp32, beside HF's own bf16 against HF fp32; and ours against HF bf16."""
    from results import Figure

    table, workload = result["agreement"], f"bf16 agreement (0.6b, {result['weights']})"
    out = []
    if "hf_fp32 vs ours_triton" in table:
        out.append(Figure(workload, "teacher-forced top-1 agreement with HF fp32", "fraction",
                          table["hf_fp32 vs ours_triton"], "LLM bf16, Triton attention", peer="HF bf16 (sdpa)",
                          peer_value=table.get("hf_bf16 vs hf_fp32")))
    if "hf_bf16 vs ours_triton" in table:
        out.append(Figure(workload, "teacher-forced top-1 agreement with HF bf16", "fraction",
                          table["hf_bf16 vs ours_triton"], "LLM bf16, Triton attention", peer="HF bf16 eager attention",
                          peer_value=table.get("hf_bf16 vs hf_bf16_eager")))
    if "ours_triton vs ours_triton_fp8" in table:
        out.append(Figure(workload, "teacher-forced top-1 agreement with our bf16 KV cache", "fraction",
                          table["ours_triton vs ours_triton_fp8"], "LLM bf16, FP8 KV cache",
                          peer="HF bf16 eager attention vs HF bf16 (sdpa)",
                          peer_value=table.get("hf_bf16 vs hf_bf16_eager")))
    return out


if __name__ == "__main__":
    main()
