"""pipeline("text-generation") over an accelerated model: HF's results, and a list reaches the engine as one batch."""
import copy

import pytest
import torch
from transformers import pipeline

import hf_minivllm
from conftest import _smollm2
from hf_minivllm.patches.model import state_of

STRINGS = ["The capital of France is", "Once upon a time", "1, 2, 3,"]
CHATS = [[{"role": "user", "content": f"Tell me about {topic}."}] for topic in ("the moon", "honey bees", "tea")]
GREEDY = dict(max_new_tokens=12, do_sample=False)


@pytest.fixture(scope="module")
def hf_pipeline():
    """HF's pipeline over an unpatched copy of the embedded model, each input and settings run once for the module
    (generating only reads the copy's weights); gives a fresh copy of the result."""
    model, tokenizer = _smollm2()
    plain = pipeline("text-generation", model=copy.deepcopy(model), tokenizer=tokenizer)
    results = {}

    def run(inputs, **kwargs):
        key = repr((inputs, sorted(kwargs.items())))
        if key not in results:
            results[key] = plain(inputs, **kwargs)
        return copy.deepcopy(results[key])

    return run


@pytest.fixture
def pipes(smollm2, hf_pipeline):
    """(pipeline over the accelerated model, HF's pipeline over an unpatched copy, engine request batches seen)."""
    model, tokenizer = smollm2
    accelerated = pipeline("text-generation", model=model, tokenizer=tokenizer)  # made before accelerate: still served
    hf_minivllm.accelerate(model)
    engine = state_of(model).llm.engine
    batches = []
    new_sequences = engine.new_sequences

    def spy(prompts, params):
        batches.append(len(prompts))
        return new_sequences(prompts, params)

    engine.new_sequences = spy
    return accelerated, hf_pipeline, batches


@pytest.mark.parametrize(
    "inputs, kwargs",
    [
        (STRINGS, {}),
        (CHATS, {}),
        (CHATS, dict(return_full_text=False)),
        (STRINGS, dict(batch_size=2)),
        (STRINGS, dict(repetition_penalty=1.3, return_full_text=False)),
    ],
    ids=["strings", "chats", "chats-new-text", "batch-size-2", "with-processor"],
)
def test_list_input_same_text_as_hf_in_one_engine_batch(pipes, inputs, kwargs):
    accelerated, plain, batches = pipes
    got = accelerated(inputs, **GREEDY, **kwargs)
    expected = plain(inputs, **GREEDY, **{k: v for k, v in kwargs.items() if k != "batch_size"})
    assert got == expected
    assert batches == [len(inputs)], "every prompt of the list must reach the engine in one batch"


@pytest.mark.parametrize("single", [STRINGS[0], CHATS[0]], ids=["string", "chat"])
def test_single_input_same_text_as_hf(pipes, single):
    accelerated, plain, batches = pipes
    assert accelerated(single, **GREEDY) == plain(single, **GREEDY)
    assert batches == [1]


def test_sampling_grouping_and_tensors(pipes):
    accelerated, _, batches = pipes
    torch.manual_seed(0)
    first = accelerated(STRINGS, max_new_tokens=6, do_sample=True, num_return_sequences=2, return_tensors=True)
    torch.manual_seed(0)
    second = accelerated(STRINGS, max_new_tokens=6, do_sample=True, num_return_sequences=2, return_tensors=True)
    assert first == second
    assert [len(records) for records in first] == [2, 2, 2]
    assert all("generated_token_ids" in record for records in first for record in records)
    assert batches == [6, 6]


def test_pipeline_over_a_plain_model_is_untouched(smollm2, hf_pipeline):
    model, tokenizer = smollm2
    hf_minivllm.accelerate(copy.deepcopy(model))  # installs the pipeline hook
    plain = pipeline("text-generation", model=model, tokenizer=tokenizer)
    reference = [hf_pipeline(text, **GREEDY) for text in STRINGS]  # one prompt at a time: no list to hook
    assert plain(STRINGS, **GREEDY) == reference
