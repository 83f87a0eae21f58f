"""An accelerated model inside a training loop: TRL's GRPOTrainer rolls out through ``model.generate`` (no vLLM).

GRPOTrainer (checked against trl 1.16) calls ``model.generate(input_ids=, attention_mask=,
generation_config=GenerationConfig(do_sample=True, max_new_tokens=..., top_k=0, disable_compile=True, ...))`` on
the very model object it was given (``unwrap_model_for_generation`` is a no-op on one CPU process), then trains
that object's parameters in place with AdamW. The engine must therefore (1) serve the rollouts, (2) leave every
parameter trainable, and (3) after the weights change, not answer from KV blocks it cached before: the prompts'
prefixes (SmolLM2's chat template starts with a ~30-token system prompt, two full 16-token blocks) sit in the
prefix cache from the rollouts, and greedy ``generate`` on the same prompts must equal a plain HF copy of the
trained weights.

One 3-step GRPO run on the embedded SmolLM2-135M-Instruct (about 20 s on a 2-core CPU, plus the session's shared
model load) feeds all the tests of this module.
"""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

import hf_minivllm  # noqa: E402

PROMPTS = ["Name a fruit.", "Say hello.", "Count to three.", "What color is the sky?"]


def _embedded_smollm2():
    try:  # the session's shared (lru-cached) load, so the suite pays for it once
        from conftest import _smollm2
    except ImportError:
        from hf_minivllm.models.loading import load_embedded_model as _smollm2
    return _smollm2()


def _plain_model(config, state_dict, generation_config):
    """An unpatched fp32 HF model with the given weights (GGUF's quantization marker dropped: Trainer refuses
    models it calls quantized)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict({name: tensor.detach().clone() for name, tensor in state_dict.items()})
    model.generation_config = copy.deepcopy(generation_config)
    assert getattr(model, "hf_quantizer", None) is None
    return model


def _reward_length(completions, **kwargs):
    """Characters in the completion: varies between samples, so GRPO's advantages (and gradients) are non-zero."""
    return [float(len(c[-1]["content"] if isinstance(c, list) else c)) for c in completions]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    loaded, tokenizer = _embedded_smollm2()
    model = _plain_model(loaded.config, loaded.state_dict(), loaded.generation_config)
    trainable_before = {name for name, p in model.named_parameters() if p.requires_grad}
    hf_minivllm.accelerate(model)  # before the trainer is built, so the rollouts go through the engine
    frozen_by_accelerate = sorted(name for name, p in model.named_parameters()
                                  if name in trainable_before and not p.requires_grad)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    chats = [[{"role": "user", "content": text}] for text in PROMPTS]
    args = GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("grpo")),
        max_steps=3,
        per_device_train_batch_size=4,  # 2 prompts x 2 completions per step
        num_generations=2,
        max_completion_length=12,
        learning_rate=1e-4,
        use_cpu=True,
        bf16=False,
        fp16=False,
        use_vllm=False,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=_reward_length, args=args,
                          train_dataset=Dataset.from_dict({"prompt": chats}), processing_class=tokenizer)
    rollout_stats = hf_minivllm.stats(model)
    trainer.train()
    return dict(model=model, tokenizer=tokenizer, trainer=trainer, chats=chats, before=before,
                trainable_before=trainable_before,
                frozen_by_accelerate=frozen_by_accelerate, stats_before_train=rollout_stats,
                stats=hf_minivllm.stats(model))


def test_grpo_rollouts_are_served_by_the_engine(grpo_run):
    stats, trainer, model = grpo_run["stats"], grpo_run["trainer"], grpo_run["model"]
    assert trainer.model is model and trainer.model_wrapped is model  # nothing wrapped or replaced it
    assert grpo_run["stats_before_train"]["requests"] == 0
    # 3 steps x (2 prompts x 2 generations) rows
    assert stats["requests"] >= 12, stats
    assert stats["fallbacks"] == 0, f"rollouts handed to HF: {stats['fallback_reasons']}"


def test_accelerate_leaves_every_parameter_trainable(grpo_run):
    frozen = grpo_run["frozen_by_accelerate"]
    assert not frozen, f"accelerate() set requires_grad=False on {len(frozen)} parameters, e.g. {frozen[:4]}"


def test_grpo_training_changes_the_weights(grpo_run):
    params = dict(grpo_run["model"].named_parameters())
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        assert not torch.equal(params[name].detach(), grpo_run["before"][name]), f"{name} did not change"
    unchanged = sorted(name for name in grpo_run["trainable_before"]
                       if torch.equal(params[name].detach(), grpo_run["before"][name]))
    assert not unchanged, f"{len(unchanged)} parameters did not change in training, e.g. {unchanged[:4]}"


def test_generate_after_training_matches_plain_hf_on_the_rollout_prompts(grpo_run):
    model, tokenizer = grpo_run["model"], grpo_run["tokenizer"]
    model.eval()
    # The prompts exactly as GRPOTrainer tokenized them for its rollouts (the engine cached their prefixes).
    texts = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
             for chat in grpo_run["chats"]]
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    rollout_ids = tokenizer.apply_chat_template(grpo_run["chats"], add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
    assert [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])] == \
        [list(ids) for ids in rollout_ids]
    # Trainer.train aligned the model's special tokens with the tokenizer's (eos [1, 2] here): the copy gets them.
    plain = _plain_model(model.config, model.state_dict(), model.generation_config).eval()

    hits_before = hf_minivllm.stats(model)["prefix_cache_hit_tokens"]
    got = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    hits = hf_minivllm.stats(model)["prefix_cache_hit_tokens"] - hits_before
    want = plain.generate(**inputs, max_new_tokens=16, do_sample=False)
    if not torch.equal(got, want):
        width = inputs["input_ids"].shape[1]
        rows = [f"  engine: {tokenizer.decode(g[width:])!r}\n  hf:     {tokenizer.decode(w[width:])!r}"
                for g, w in zip(got, want) if not torch.equal(g, w)]
        pytest.fail(f"greedy generate after training differs from plain HF on {len(rows)} of {len(texts)} rows "
                    f"(the engine reused {hits} prefix-cache tokens in this call):\n" + "\n".join(rows))
