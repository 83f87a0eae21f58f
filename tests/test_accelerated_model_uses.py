"""What ``accelerate`` attaches to a model, seen from the model's other uses: copies of it and ``restore``."""
import contextlib
import copy
import io

import pytest
import torch

import hf_minivllm
from conftest import left_padded_batch, tiny_model

GREEDY = dict(max_new_tokens=6, do_sample=False)


def test_a_copy_of_an_accelerated_model_is_a_plain_hf_model_and_the_original_keeps_its_engine():
    """``copy.deepcopy`` (a reference or EMA model) and ``torch.save`` of the whole module must work; the copy has
    its own weights, so the engine (which shares the original's) must not answer for it."""
    model = hf_minivllm.accelerate(tiny_model("llama"), num_kvcache_blocks=64, kvcache_block_size=4)
    ids, mask = left_padded_batch(lengths=(20, 13))
    expected = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for duplicate in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        with torch.no_grad():
            duplicate.model.layers[0].mlp.down_proj.weight.mul_(-3.0)
        got = duplicate.generate(input_ids=ids, attention_mask=mask, **GREEDY)
        assert torch.equal(got, type(duplicate).generate(duplicate, input_ids=ids, attention_mask=mask, **GREEDY))
        assert not torch.equal(got, expected), "the copy's change must matter, or the test proves nothing"
        assert hf_minivllm.accelerate(duplicate) is duplicate  # and it can be accelerated on its own
        assert torch.equal(duplicate.generate(input_ids=ids, attention_mask=mask, **GREEDY), got)
        hf_minivllm.restore(duplicate)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **GREEDY), expected)
    assert hf_minivllm.stats(model)["requests"] == 4 and hf_minivllm.stats(model)["weight_updates"] == 0


def test_restore_gives_back_the_generate_the_instance_had():
    """A ``generate`` set on the instance before ``accelerate`` (a wrapper of another library) is the model's own:
    ``restore`` puts it back, and a model left to transformers keeps it."""
    for family, quantization in (("llama", None), ("qwen3", {"quant_method": "gptq"})):
        model = tiny_model(family)
        if quantization is not None:
            model.config.quantization_config = quantization  # unsupported: left to transformers
        own_generate = model.generate
        model.generate = own_generate  # set on the instance (another library's wrapper would be)
        with pytest.warns(UserWarning, match="gptq") if quantization else contextlib.nullcontext():
            hf_minivllm.accelerate(model, num_kvcache_blocks=32, kvcache_block_size=4)
        assert (model.generate is own_generate) == (quantization is not None)
        hf_minivllm.restore(model)
        assert model.__dict__["generate"] is own_generate


def test_reset_prefix_cache_on_a_model_left_to_transformers_is_a_no_op():
    """``accelerate`` promises a model it cannot serve goes on working at HF's speed; the training loop's
    ``reset_prefix_cache`` after ``param.data`` edits must not break it (there is no cache to reset)."""
    model = tiny_model("llama")
    model.config.quantization_config = {"quant_method": "gptq"}
    with pytest.warns(UserWarning, match="gptq"):
        hf_minivllm.accelerate(model)
    hf_minivllm.reset_prefix_cache(model)
    hf_minivllm.restore(model)
    with pytest.raises(ValueError, match="not accelerated"):
        hf_minivllm.reset_prefix_cache(model)


def test_a_pruned_projection_is_left_to_transformers_before_and_after_accelerate():
    """torch's pruning turns a weight into a forward pre-hook's product (``weight_orig`` times a mask): the engine
    would not run the hook, so such a model goes to HF, whether pruned before ``accelerate`` or between calls, and
    comes back to the engine once the pruning is made permanent."""
    from torch.nn.utils import prune

    ids, mask = left_padded_batch(lengths=(20, 13))
    model = tiny_model("llama")
    prune.l1_unstructured(model.model.layers[0].mlp.down_proj, "weight", amount=0.5)
    with pytest.warns(UserWarning, match="pre-hook"):
        hf_minivllm.accelerate(model, num_kvcache_blocks=64, kvcache_block_size=4)
    assert "pre-hook" in hf_minivllm.stats(model)["unsupported_reason"]
    hf_minivllm.restore(model)
    model = hf_minivllm.accelerate(tiny_model("llama"), num_kvcache_blocks=64, kvcache_block_size=4)
    model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    prune.l1_unstructured(model.model.layers[0].mlp.down_proj, "weight", amount=0.5)
    for pruned in (True, False):
        expected = type(model).generate(model, input_ids=ids, attention_mask=mask, **GREEDY)
        with pytest.warns(UserWarning, match="pre-hook") if pruned else contextlib.nullcontext():
            assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **GREEDY), expected)
        if pruned:
            prune.remove(model.model.layers[0].mlp.down_proj, "weight")  # pruned for good: a plain parameter again
    stats = hf_minivllm.stats(model)
    assert stats["fallbacks"] == 1 and stats["rebuilds"] == 1 and stats["requests"] == 4


def test_a_model_compiled_for_training_is_accelerated_through_its_wrapper():
    """``torch.compile(model)`` (for the training steps) wraps the model; ``accelerate`` used to see an unknown
    architecture and leave it to HF. It serves the model inside, and the wrapper's training steps are seen."""
    model = tiny_model("qwen3")
    compiled = torch.compile(model, backend="eager")  # no code generation: the wrapper is what matters here
    assert hf_minivllm.accelerate(compiled) is compiled
    assert hf_minivllm.stats(compiled)["unsupported_reason"] is None
    ids, mask = left_padded_batch(lengths=(20, 13))
    before = compiled.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    assert hf_minivllm.stats(compiled)["steps"] > 0
    compiled.train()
    optimizer = torch.optim.SGD(compiled.parameters(), lr=0.5)
    compiled(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    optimizer.step()
    compiled.eval()
    twin = tiny_model("qwen3")
    twin.load_state_dict(model.state_dict())
    after = compiled.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    assert torch.equal(after, type(twin).generate(twin, input_ids=ids, attention_mask=mask, **GREEDY))
    assert not torch.equal(after, before), "the training step must matter, or the test proves nothing"
    hf_minivllm.restore(compiled)
    assert "generate" not in model.__dict__, "restore through the wrapper gives the model HF's generate back"
