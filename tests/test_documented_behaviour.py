"""What the README and docs/ promise, held against the code: the settings and defaults they list, the files they
name, and the figures the demo (`make demo`) prints."""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
from pathlib import Path

import torch

import hf_minivllm
from conftest import left_padded_batch, tiny_model
from hf_minivllm import Config, SamplingParams

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _default(field: dataclasses.Field) -> object:
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def test_readme_sampling_params_signature_lists_every_field_with_its_default():
    signature = re.search(r"`SamplingParams\(([^`]*)\)`", README)
    assert signature, "README.md no longer shows the SamplingParams signature"
    call = ast.parse(f"f({' '.join(signature[1].split())})", mode="eval").body
    documented = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
    assert documented == {field.name: _default(field) for field in dataclasses.fields(SamplingParams)}


def test_readme_config_table_lists_every_field_with_its_default():
    table = {name: value.strip().strip('`"') for name, value in re.findall(r"^\| `(\w+)` \| ([^|]+) \|", README, re.M)}
    fields = [field for field in dataclasses.fields(Config) if field.name != "model"]
    assert set(table) == {field.name for field in fields}
    for field in fields:
        if field.name == "kv_cache_resident":  # None: each front end picks its own, checked below
            continue
        assert table[field.name] == str(field.default), field.name


def test_kv_cache_residency_defaults_are_the_documented_ones():
    engine = dict(num_kvcache_blocks=16, kvcache_block_size=4)
    with hf_minivllm.LLM(tiny_model("llama"), **engine) as llm:
        assert llm.config.kv_cache_resident is True
    model = hf_minivllm.accelerate(tiny_model("llama"), **engine)
    from hf_minivllm.patches.model import state_of

    assert state_of(model).llm.config.kv_cache_resident is False
    hf_minivllm.restore(model)


def test_files_the_docs_name_exist():
    named = {path for doc in DOCS for path in re.findall(r"`([\w./-]+\.(?:py|md|png|json))`", doc.read_text())
             if "/" in path}
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert not missing, f"the docs name files that do not exist: {missing}"


def _quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_counts_the_tokens_the_engine_generated():
    """The demo's tokens/s: rows that end early are padded with the generation config's pad token (here the eos
    token, as for the embedded SmolLM2), which must not count as generated."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    free_run = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8)
    early_token = int(free_run[0, ids.shape[1] + 2])  # row 0 ends after 3 tokens
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = early_token
    model = hf_minivllm.accelerate(model, num_kvcache_blocks=64, kvcache_block_size=4)
    before = hf_minivllm.stats(model)["generated_tokens"]
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8)
    generated = hf_minivllm.stats(model)["generated_tokens"] - before
    assert generated < out[:, ids.shape[1]:].numel()
    assert _quickstart().generated_tokens(model, out, ids.shape[1]) == generated
    hf_minivllm.restore(model)
