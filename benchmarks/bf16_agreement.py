"""Teacher-forced top-1 agreement in bf16 on the Qwen3-0.6B architecture (random init): ours against HF, and HF
against itself, to tell our rounding differences from the noise floor of a random model's flat logits.

For 4 x 500 random tokens: top-1 of HF bf16 (sdpa, its default), HF bf16 eager attention, HF fp32 (the rounding-free
reference), and our engine's prefill forward in bf16 with the Triton and the torch attention backend. Prints every
pair's agreement and, where ours and HF bf16 disagree, how far apart the two tokens' logits are in HF's own scores.
"""
from __future__ import annotations

import argparse
import copy
import json

import torch

from hf_minivllm import LLM
from hf_minivllm.layers.context import AttentionMetadata, set_attention_metadata
from workloads import commit, random_model


def engine_logits(llm: LLM, tokens: torch.Tensor) -> torch.Tensor:
    """Our decoder's logits for every position of one prompt (a single prefill over a fresh cache)."""
    length = len(tokens)
    table = list(range((length + llm.engine.runner.block_size - 1) // llm.engine.runner.block_size))
    metadata = AttentionMetadata(
        is_prefill=True,
        slot_mapping=torch.arange(length, device="cuda"),
        block_tables=torch.tensor([table], dtype=torch.int32, device="cuda"),
        cu_seqlens_q=torch.tensor([0, length], dtype=torch.int32, device="cuda"),
        cu_seqlens_k=torch.tensor([0, length], dtype=torch.int32, device="cuda"),
        max_seqlen_q=length,
        max_seqlen_k=length,
    )
    set_attention_metadata(metadata)
    try:
        with torch.inference_mode():
            hidden = llm.model(tokens.cuda(), torch.arange(length, device="cuda"))
            return llm.model.compute_logits(hidden).float()
    finally:
        set_attention_metadata(None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out")
    args = parser.parse_args()
    model = random_model("0.6b")
    hf_eager = copy.deepcopy(model)
    hf_eager.set_attn_implementation("eager")
    hf_fp32 = copy.deepcopy(model).float()
    ours = {backend: LLM(copy.deepcopy(model), max_model_len=1024, enforce_eager=True, num_kvcache_blocks=64,
                         attention_backend=backend) for backend in ("triton", "torch")}
    generator = torch.Generator().manual_seed(3)
    top1: dict[str, list[torch.Tensor]] = {}
    gaps = []
    for _ in range(4):
        tokens = torch.randint(0, 10000, (500,), generator=generator)
        with torch.no_grad():
            hf_logits = model(tokens[None].cuda()).logits[0].float()
            rows = {"hf_bf16": hf_logits, "hf_bf16_eager": hf_eager(tokens[None].cuda()).logits[0].float(),
                    "hf_fp32": hf_fp32(tokens[None].cuda()).logits[0].float()}
        rows.update({f"ours_{backend}": engine_logits(llm, tokens) for backend, llm in ours.items()})
        for name, logits in rows.items():
            top1.setdefault(name, []).append(logits.argmax(-1))
        differ = rows["ours_triton"].argmax(-1) != hf_logits.argmax(-1)
        hf_top = hf_logits.max(-1).values
        hf_of_ours = hf_logits.gather(-1, rows["ours_triton"].argmax(-1, keepdim=True))[:, 0]
        gaps += ((hf_top - hf_of_ours)[differ] / hf_logits.std(-1)[differ]).tolist()
    top1 = {name: torch.cat(values) for name, values in top1.items()}
    names = list(top1)
    table = {f"{a} vs {b}": float((top1[a] == top1[b]).float().mean()) for i, a in enumerate(names) for b in names[i + 1:]}
    print(f"{torch.cuda.get_device_name()}, commit {commit()}, 2000 positions")
    for pair, value in table.items():
        print(f"   {pair:34s} {value:.4f}")
    print(f"ours_triton vs hf_bf16 disagreements: {len(gaps)}; HF's logit gap between the two tokens, in units of "
          f"its logits' std: max {max(gaps, default=0):.4f}, median {sorted(gaps)[len(gaps) // 2] if gaps else 0:.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"commit": commit(), "agreement": table, "gaps_in_std": gaps}, f, indent=2)


if __name__ == "__main__":
    main()
