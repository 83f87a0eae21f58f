"""Corners of HF's generate contract the conformance matrix does not reach: dtypes, and stopping without eos.

One tiny model and its unpatched copy (the oracle), shared by the module; every call must be served by the engine.
"""
import copy

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

import hf_minivllm
from conftest import SMALL_ENGINE, left_padded_batch, tiny_model


@pytest.fixture(scope="module")
def pair():
    """(accelerated tiny qwen3, its unpatched copy, left-padded ids, mask)."""
    model = tiny_model("qwen3")
    oracle = copy.deepcopy(model)
    hf_minivllm.accelerate(model, **SMALL_ENGINE)
    ids, mask = left_padded_batch()
    return model, oracle, ids, mask


class RecordingStreamer(BaseStreamer):
    def __init__(self):
        self.values = []

    def put(self, value):
        self.values.append(value)

    def end(self):
        pass


def test_int32_prompt_gives_hf_int64_sequences_and_streamed_tokens(pair):
    model, oracle, ids, mask = pair
    settings = dict(input_ids=ids.int(), attention_mask=mask, max_new_tokens=4, do_sample=False)
    got_streamer, expected_streamer = RecordingStreamer(), RecordingStreamer()
    got = model.generate(**settings, streamer=got_streamer)
    expected = oracle.generate(**settings, streamer=expected_streamer)
    assert got.dtype == expected.dtype == torch.long
    assert torch.equal(got, expected)
    assert [v.dtype for v in got_streamer.values] == [v.dtype for v in expected_streamer.values]


class StopRowsAt(StoppingCriteria):
    """Row i is done once it generated ``steps[i]`` tokens (None: never)."""

    def __init__(self, width, steps):
        self.width, self.steps = width, steps

    def __call__(self, input_ids, scores, **kwargs):
        generated = input_ids.shape[1] - self.width
        return torch.tensor([step is not None and generated >= step for step in self.steps])


@pytest.mark.parametrize("return_dict", [False, True], ids=["tensor", "scores"])
def test_rows_stopped_without_an_eos_criterion_keep_hf_real_tokens(pair, return_dict):
    """With no eos HF has no eos criterion and never pads: a row a criterion stopped goes on generating real tokens
    until the last row is done."""
    model, oracle, ids, mask = pair
    fallbacks = hf_minivllm.stats(model)["fallbacks"]
    settings = dict(
        input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
        stopping_criteria=StoppingCriteriaList([StopRowsAt(ids.shape[1], [2, 4, None, 3])]),
        return_dict_in_generate=return_dict, output_scores=return_dict,
    )
    got, expected = model.generate(**settings), oracle.generate(**settings)
    if return_dict:
        assert len(got.scores) == len(expected.scores)
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got.scores, expected.scores))
        got, expected = got.sequences, expected.sequences
    assert torch.equal(got, expected)
    assert hf_minivllm.stats(model)["fallbacks"] == fallbacks


def test_inputs_and_input_ids_together_raise_like_hf(pair):
    """HF refuses ``inputs`` alongside ``input_ids=``; the engine must not quietly take one of them."""
    model, oracle, ids, mask = pair
    settings = dict(attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="were passed alongside"):
        oracle.generate(ids, input_ids=ids.flip(0), **settings)
    with (pytest.warns(UserWarning, match="inputs and input_ids"),
          pytest.raises(ValueError, match="were passed alongside")):
        model.generate(ids, input_ids=ids.flip(0), **settings)


@pytest.mark.parametrize("eos", [-1, [-1, 163], 10**6], ids=["negative", "negative-in-list", "beyond-vocab"])
def test_eos_ids_outside_the_vocabulary_stop_nothing_like_hf(pair, eos):
    """HF warns about such ids and generates on (``eos_token_id=-1`` is a common "never stop"); no ValueError."""
    model, oracle, ids, mask = pair
    settings = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos)
    fallbacks = hf_minivllm.stats(model)["fallbacks"]
    assert torch.equal(model.generate(**settings), oracle.generate(**settings))
    assert hf_minivllm.stats(model)["fallbacks"] == fallbacks
