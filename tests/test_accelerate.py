"""The accelerated model stays the same HF model: object, class, config, forward, no duplicated weights."""
import copy

import torch

import hf_minivllm
from conftest import tiny_model


def parameter_bytes(model):
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


def test_same_object_class_and_configs_forward_unchanged():
    model = tiny_model("qwen3")
    oracle = copy.deepcopy(model)
    config, generation_config, cls = model.config, model.generation_config, type(model)
    bytes_before = parameter_bytes(model)
    ids = torch.randint(3, 300, (2, 9))
    assert hf_minivllm.accelerate(model, num_kvcache_blocks=32, kvcache_block_size=4) is model
    assert type(model) is cls and model.config is config and model.generation_config is generation_config
    assert torch.allclose(model(ids).logits, oracle(ids).logits, atol=1e-6)
    assert parameter_bytes(model) <= bytes_before, "accelerate must not duplicate weights"


def test_second_accelerate_is_harmless_and_restore_undoes_the_patch():
    model = tiny_model("llama")
    oracle = copy.deepcopy(model)
    hf_minivllm.accelerate(model, num_kvcache_blocks=32, kvcache_block_size=4)
    engine_generate = model.generate
    assert hf_minivllm.accelerate(model) is model and model.generate == engine_generate
    ids = torch.randint(3, 300, (1, 6))
    hf_minivllm.restore(model)
    assert "generate" not in model.__dict__
    expected = oracle.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), expected)
