"""W4 through ``pipeline()``: the accelerated pipeline vs ``LLM.generate`` vs the unpatched pipeline, same prompts.

W4 (DESIGN.md section 3): SmolLM2-135M-Instruct fp32 on the CPU, 32 chat prompts, 64 new tokens, greedy. The
pipeline gets the chat lists (its chat template applies), ``LLM.generate`` the same templated prompts as token ids.
Both engine paths get one warm-up call first; the unpatched pipeline runs once (default ``batch_size=1``, one
``generate`` per prompt, which is what a user gets). Prints a table and whether the two pipelines' texts agree.
"""
import argparse
import copy
import platform

import torch
from transformers import pipeline

import hf_minivllm
from hf_minivllm import LLM, SamplingParams
from hf_minivllm.models.loading import load_embedded_model
from w4_cpu import MAX_NEW_TOKENS, TOPICS
from workloads import commit, timed, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads (all paths)")
    parser.add_argument("--skip-unpatched", action="store_true", help="skip the slow unpatched pipeline")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_embedded_model()
    plain_model = copy.deepcopy(model)
    chats = [[{"role": "user", "content": f"Tell me about {topic}."}] for topic in TOPICS]
    settings = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, return_full_text=False)
    rows = []

    def record(name, seconds, texts):
        tokens = sum(len(tokenizer.encode(text, add_special_tokens=False)) for text in texts)
        rows.append({"path": name, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds})

    llm = LLM(copy.deepcopy(model), tokenizer=tokenizer)
    prompt_ids = [tokenizer.apply_chat_template(chat, add_generation_prompt=True) for chat in chats]
    prompt_ids = [list(ids["input_ids"] if hasattr(ids, "keys") else ids) for ids in prompt_ids]
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS, stop_token_ids=llm.engine.eos_token_ids)
    llm.generate(prompt_ids, params, use_tqdm=False)
    outputs, seconds = timed(lambda: llm.generate(prompt_ids, params, use_tqdm=False))
    record("LLM.generate (32 prompts)", seconds, [o["text"] for o in outputs])

    hf_minivllm.accelerate(model)
    fast_pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    fast_pipe(chats, **settings)
    fast, seconds = timed(lambda: fast_pipe(chats, **settings))
    record("accelerated pipeline (list of 32)", seconds, [o[0]["generated_text"] for o in fast])

    identical = None
    if not args.skip_unpatched:
        plain_pipe = pipeline("text-generation", model=plain_model, tokenizer=tokenizer)
        plain, seconds = timed(lambda: plain_pipe(chats, **settings))
        record("unpatched pipeline (default batch_size)", seconds, [o[0]["generated_text"] for o in plain])
        identical = plain == fast

    rates = {row["path"]: row["tokens_per_s"] for row in rows}
    llm_rate = rates["LLM.generate (32 prompts)"]
    print(f"W4 pipeline on CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, commit {commit()}")
    print(f"{'path':42s} {'seconds':>8s} {'tokens':>7s} {'tok/s':>8s} {'vs LLM':>7s}")
    for row in rows:
        print(f"{row['path']:42s} {row['seconds']:8.2f} {row['tokens']:7d} {row['tokens_per_s']:8.1f} "
              f"{row['tokens_per_s'] / llm_rate:6.2f}x")
    if identical is not None:
        speedup = rates["accelerated pipeline (list of 32)"] / rates["unpatched pipeline (default batch_size)"]
        print(f"accelerated pipeline vs unpatched: {speedup:.2f}x; same texts: {identical}")
    write_results(args.out, threads=torch.get_num_threads(), rows=rows, identical_texts=identical)


if __name__ == "__main__":
    main()
