"""The model folder that W6's servers load: W1's random Qwen3 saved with ``save_pretrained``, and a tokenizer made
for it.

Servers read a folder (config, safetensors weights, tokenizer), while W1's requests are token ids. The tokenizer
therefore maps id ``i`` to the word ``t{i}`` and back, over the whole vocabulary: the text ``"t5 t17 t9"`` is exactly
ids ``[5, 17, 9]`` in every server, any id the model emits decodes to one word (so a streamed chunk's word count is
its token count), and the chat template only concatenates message contents, adding no token. The eos id of the
config (151645) is the tokenizer's eos token, ``t151645``. A response template that starts at the end of the prompt
keeps ``transformers serve`` from applying its built-in Qwen3 parser, which looks for ``<|im_start|>assistant`` and,
not finding it, streams the whole prompt back as the first content chunk.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from workloads import qwen3_config

CHAT_TEMPLATE = "{% for message in messages %}{% if not loop.first %} {% endif %}{{ message['content'] }}{% endfor %}"
RESPONSE_TEMPLATE = {"start_anchor_pattern": r"\Z", "fields": {"content": {"content": "text"}}}
SIZES = ("0.6b", "tiny")


def prompt_text(ids: list[int]) -> str:
    """The text that the folder's tokenizer turns into exactly ``ids``."""
    return " ".join(f"t{i}" for i in ids)


def model_config(size: str):
    """W1's Qwen3-0.6B architecture, or a two-layer model with the same vocabulary for checks on a CPU."""
    if size == "tiny":
        from transformers import Qwen3Config

        return Qwen3Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=40960,
                           tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645)
    return qwen3_config(size)


def build_tokenizer(vocab_size: int, eos_id: int, pad_id: int):
    """A word-level tokenizer over ``t0 .. t{vocab_size-1}`` that splits on whitespace and joins with spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # no token starts with ##: a plain space join
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=f"t{eos_id}", pad_token=f"t{pad_id}",
                                   chat_template=CHAT_TEMPLATE, response_template=RESPONSE_TEMPLATE)


def check_tokenizer(folder: str) -> None:
    """Ids -> text -> ids round trip and the chat template's output, as both servers will load the folder."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = [5, 17, 9, 10000, 151935]
    assert tokenizer(prompt_text(ids))["input_ids"] == ids, "text of ids does not tokenize back to the ids"
    assert tokenizer.decode(ids) == prompt_text(ids), "ids do not decode to their text"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt_text(ids)}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)
    assert chat["input_ids"] == ids, f"chat template adds tokens: {chat['input_ids']}"


def build_model_folder(path: str, size: str = "0.6b", seed: int = 0) -> str:
    """Write the model folder to ``path`` (reused when it already holds this size and seed); returns ``path``.

    Weights are initialised as in ``workloads.random_model`` (same seed, bf16), on the GPU when there is one.
    """
    from transformers import AutoModelForCausalLM

    stamp = {"size": size, "seed": seed}
    stamp_path = os.path.join(path, "w6_model.json")
    if os.path.exists(stamp_path):
        with open(stamp_path) as f:
            if json.load(f) == stamp:
                return path
    shutil.rmtree(path, ignore_errors=True)
    config = model_config(size)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    build_tokenizer(config.vocab_size, config.eos_token_id, config.bos_token_id).save_pretrained(path)
    check_tokenizer(path)
    with open(stamp_path, "w") as f:
        json.dump(stamp, f)
    return path
