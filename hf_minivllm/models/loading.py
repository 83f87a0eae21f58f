"""Reading what the engine needs from a HF model folder or a loaded HF model (tokenizer, eos ids)."""
from __future__ import annotations

from typing import Any


def load_tokenizer(path: str) -> Any:
    """The tokenizer of a local model folder (no hub access)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


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
