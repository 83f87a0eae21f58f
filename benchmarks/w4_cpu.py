"""W4 (DESIGN.md section 3): SmolLM2-135M-Instruct fp32 on the CPU, 32 chat prompts, 64 new tokens, greedy.

Measured in one process, one after another on the same prompts: plain HF `generate` on the padded batch, HF
`pipeline` with its default batch size, `LLM.generate`, and the accelerated model's `generate` (and `pipeline`).
Each engine path gets one warm-up call first. Prints a table and, with --out, writes it as JSON.
"""
import argparse
import copy
import platform

import torch

import hf_minivllm
from hf_minivllm import LLM, SamplingParams
from hf_minivllm.models.loading import load_embedded_model
from results import record as record_figures
from workloads import commit, timed, write_results

TOPICS = [
    "the moon", "volcanoes", "honey bees", "the Roman empire", "photosynthesis", "jazz music", "chess openings",
    "the water cycle", "black holes", "coffee", "the printing press", "penguins", "electric cars", "origami",
    "the Amazon river", "vaccines", "tea ceremonies", "glaciers", "the violin", "solar panels", "octopuses",
    "the Great Wall", "rainbows", "bread baking", "the internet", "dinosaurs", "tides", "the piano", "deserts",
    "lighthouses", "compost", "hot air balloons",
]
MAX_NEW_TOKENS = 64


def figures(result: dict) -> list:
    """Our two paths beside HF generate on the same batch (benchmarks/results, see results.py)."""
    from results import Figure

    rates = {row["path"]: row["tokens_per_s"] for row in result["rows"]}
    hf = "HF generate (padded batch of 32)"
    return [Figure("W4 (CPU, SmolLM2, 32 chats)", "output throughput", "tok/s", rate, path, peer=hf,
                   peer_value=rates[hf]) for path, rate in rates.items() if path.startswith("hf_minivllm")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--skip-pipeline", action="store_true", help="skip the slow unpatched pipeline run")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 on a shared machine, where OpenMP threads stall on busy neighbours)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import pipeline

    model, tokenizer = load_embedded_model()
    chats = [[{"role": "user", "content": f"Tell me about {topic}."}] for topic in TOPICS]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    width = batch["input_ids"].shape[1]
    settings = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    rows = []

    def record(name, seconds, tokens):
        rows.append({"path": name, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds})

    def count(out):
        return int((out[:, width:] != tokenizer.pad_token_id).sum())

    with torch.inference_mode():
        hf_out, seconds = timed(lambda: model.generate(**batch, **settings))
    record("HF generate (padded batch of 32)", seconds, count(hf_out))

    if not args.skip_pipeline:
        pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
        outputs, seconds = timed(lambda: pipe(chats, return_full_text=False, **settings))
        tokens = sum(len(tokenizer.encode(o[0]["generated_text"], add_special_tokens=False)) for o in outputs)
        record("HF pipeline (default batch_size)", seconds, tokens)

    llm = LLM(copy.deepcopy(model), tokenizer=tokenizer)
    prompt_ids = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS, stop_token_ids=[tokenizer.eos_token_id])
    llm.generate(prompt_ids, params, use_tqdm=False)
    outputs, seconds = timed(lambda: llm.generate(prompt_ids, params, use_tqdm=False))
    record("hf_minivllm LLM.generate", seconds, sum(len(o["token_ids"]) for o in outputs))

    hf_minivllm.accelerate(model)
    with torch.inference_mode():
        model.generate(**batch, **settings)
        fast_out, seconds = timed(lambda: model.generate(**batch, **settings))
    record("hf_minivllm accelerate(model).generate", seconds, count(fast_out))
    identical = torch.equal(hf_out, fast_out)

    base = {row["path"]: row["tokens_per_s"] for row in rows}
    hf_rate = base["HF generate (padded batch of 32)"]
    pipe_rate = base.get("HF pipeline (default batch_size)")
    print(f"W4 on CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, commit {commit()}")
    print(f"{'path':42s} {'seconds':>8s} {'tokens':>7s} {'tok/s':>8s} {'vs HF gen':>9s} {'vs pipe':>8s}")
    for row in rows:
        vs_pipe = f"{row['tokens_per_s'] / pipe_rate:7.2f}x" if pipe_rate else "      -"
        print(f"{row['path']:42s} {row['seconds']:8.2f} {row['tokens']:7d} {row['tokens_per_s']:8.1f} "
              f"{row['tokens_per_s'] / hf_rate:8.2f}x {vs_pipe}")
    print(f"accelerated output identical to HF generate: {identical}")
    device = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    write_results(args.out, device=device, rows=rows, identical_to_hf=identical)
    record_figures(device, figures({"rows": rows}), "w4_cpu", commit())


if __name__ == "__main__":
    main()
