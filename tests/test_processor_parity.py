"""HF's processors, warpers and stopping criteria on the engine's batch: what the conformance matrix does not reach.

Each test compares ``accelerate(model).generate`` with an unpatched copy of the same tiny model (the oracle): token
for token under greedy or ``top_k=1`` sampling, and the per-step scores and logits HF records.
"""
import copy

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

import hf_minivllm
from conftest import SMALL_ENGINE, left_padded_batch, tiny_model

RECORDED = dict(return_dict_in_generate=True, output_scores=True, output_logits=True)


def accelerated_pair(**engine):
    """(accelerated tiny qwen3, its unpatched copy made before accelerating)."""
    model = tiny_model("qwen3")
    oracle = copy.deepcopy(model)
    hf_minivllm.accelerate(model, **(engine or SMALL_ENGINE))
    return model, oracle


@pytest.fixture(scope="module")
def pair():
    return accelerated_pair()


def free_run_eos(oracle, ids, mask):
    """Two tokens the free greedy run produces at different steps of different rows: rows end at different steps."""
    free = oracle.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)[:, ids.shape[1]:]
    return sorted({int(free[0, 4]), int(free[2, 7])})


def assert_same_output(got, expected):
    assert torch.equal(got.sequences, expected.sequences)
    for name in ("scores", "logits"):
        mine, theirs = getattr(got, name), getattr(expected, name)
        assert len(mine) == len(theirs)
        for step, (a, b) in enumerate(zip(mine, theirs)):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4, rtol=1e-4), f"{name} of step {step}"


def both(model, oracle, ids, mask, **settings):
    fallbacks = hf_minivllm.stats(model)["fallbacks"]
    got = model.generate(input_ids=ids, attention_mask=mask, **settings)
    assert hf_minivllm.stats(model)["fallbacks"] == fallbacks, "the engine should have served this call"
    return got, oracle.generate(input_ids=ids, attention_mask=mask, **settings)


class RecordingProcessor(LogitsProcessor):
    """Records what it is given; runs after HF's built-in processors, so it sees their work."""

    def __init__(self):
        self.calls = []

    def __call__(self, input_ids, scores):
        self.calls.append((input_ids.clone(), scores.clone()))
        return scores


def test_user_processor_sees_hf_inputs_once_per_step_after_the_builtin_ones(pair):
    model, oracle = pair
    ids, mask = left_padded_batch()
    got_processor, expected_processor = RecordingProcessor(), RecordingProcessor()
    settings = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0, repetition_penalty=1.4,
                    no_repeat_ngram_size=2)
    got = model.generate(input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList([got_processor]),
                         **settings)
    expected = oracle.generate(input_ids=ids, attention_mask=mask,
                               logits_processor=LogitsProcessorList([expected_processor]), **settings)
    assert torch.equal(got, expected)
    assert len(got_processor.calls) == len(expected_processor.calls) == 6
    for (got_ids, got_scores), (expected_ids, expected_scores) in zip(got_processor.calls, expected_processor.calls):
        assert torch.equal(got_ids, expected_ids)
        assert torch.allclose(got_scores, expected_scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mixed_steps", [True, False])
def test_a_call_whose_prompts_take_several_prefill_steps_still_steps_its_rows_together(mixed_steps):
    """A token budget smaller than the call's prompts prefills them over several steps. The rows done first wait
    for the others, so a processor is called once per step with the whole batch, as HF calls it: a processor with
    state of its own (a call counter here) sees what it sees under HF."""
    model, oracle = accelerated_pair(**SMALL_ENGINE, max_num_batched_tokens=8, mixed_steps=mixed_steps)
    ids, mask = left_padded_batch()
    got_processor, expected_processor = RecordingProcessor(), RecordingProcessor()
    settings = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0, **RECORDED)
    got = model.generate(input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList([got_processor]),
                         **settings)
    expected = oracle.generate(input_ids=ids, attention_mask=mask,
                               logits_processor=LogitsProcessorList([expected_processor]), **settings)
    assert_same_output(got, expected)
    assert len(got_processor.calls) == len(expected_processor.calls) == 6
    for (got_ids, got_scores), (expected_ids, expected_scores) in zip(got_processor.calls, expected_processor.calls):
        assert torch.equal(got_ids, expected_ids)
        assert torch.allclose(got_scores, expected_scores, atol=1e-4, rtol=1e-4)
    assert hf_minivllm.stats(model)["fallbacks"] == 0


class RecordingCriteria(StoppingCriteria):
    """Records what it is given and never stops a row itself."""

    def __init__(self):
        self.calls = []

    def __call__(self, input_ids, scores, **kwargs):
        self.calls.append(input_ids.clone())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@pytest.mark.parametrize("ending", ["length", "eos"])
def test_user_stopping_criteria_see_every_step_hf_shows_them(pair, ending):
    """Including the last step, where the rows end by length or by eos (HF checks its criteria after every token)."""
    model, oracle = pair
    ids, mask = left_padded_batch()
    eos = free_run_eos(oracle, ids, mask) if ending == "eos" else None
    settings = dict(max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0)
    got_criteria, expected_criteria = RecordingCriteria(), RecordingCriteria()
    got = model.generate(input_ids=ids, attention_mask=mask,
                         stopping_criteria=StoppingCriteriaList([got_criteria]), **settings)
    expected = oracle.generate(input_ids=ids, attention_mask=mask,
                               stopping_criteria=StoppingCriteriaList([expected_criteria]), **settings)
    assert torch.equal(got, expected)
    assert len(got_criteria.calls) == len(expected_criteria.calls)
    assert all(torch.equal(a, b) for a, b in zip(got_criteria.calls, expected_criteria.calls))


def test_one_token_prompts_get_forced_bos_and_begin_suppression_as_in_hf(pair):
    model, oracle = pair
    ids = torch.tensor([[17], [250]])
    mask = torch.ones_like(ids)
    for settings in (dict(forced_bos_token_id=9, begin_suppress_tokens=[9, 12]), dict(begin_suppress_tokens=[9, 12])):
        got, expected = both(model, oracle, ids, mask, max_new_tokens=5, do_sample=False, **settings, **RECORDED)
        assert_same_output(got, expected)


@pytest.mark.parametrize("setting", [dict(encoder_repetition_penalty=1.5), dict(encoder_no_repeat_ngram_size=2)],
                         ids=["encoder_repetition_penalty", "encoder_no_repeat_ngram_size"])
def test_prompt_processors_with_several_return_sequences_match_hf(pair, setting):
    """HF builds these from the unexpanded prompts while the batch holds num_return_sequences rows per prompt."""
    model, oracle = pair
    ids, mask = left_padded_batch()
    got, expected = both(model, oracle, ids, mask, max_new_tokens=8, do_sample=True, top_k=1, num_return_sequences=2,
                         **setting, **RECORDED)
    assert got.sequences.shape[0] == 8
    assert_same_output(got, expected)


def test_rows_admitted_in_waves_keep_hf_scores_and_padding():
    """More rows than the engine runs at once: later rows start steps behind, finished rows stay for the scores."""
    model, oracle = accelerated_pair(**SMALL_ENGINE, max_num_seqs=2)
    ids, mask = left_padded_batch(seed=12)
    eos = free_run_eos(oracle, ids, mask)
    for extra in (dict(do_sample=False), dict(do_sample=True, top_k=1, num_return_sequences=2)):
        got, expected = both(model, oracle, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0,
                             repetition_penalty=1.1, **extra, **RECORDED)
        assert_same_output(got, expected)


def test_prefix_cached_rerun_under_preemption_matches_hf():
    model, oracle = accelerated_pair(num_kvcache_blocks=20, kvcache_block_size=4)
    ids, mask = left_padded_batch(seed=12)
    eos = free_run_eos(oracle, ids, mask)
    settings = dict(max_new_tokens=12, do_sample=True, top_k=1, num_return_sequences=2, repetition_penalty=1.3,
                    no_repeat_ngram_size=2, eos_token_id=eos, pad_token_id=0, **RECORDED)
    for _ in range(2):
        got, expected = both(model, oracle, ids, mask, **settings)
        assert_same_output(got, expected)
    stats = hf_minivllm.stats(model)
    assert stats["preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0


class RecordingStreamer(BaseStreamer):
    def __init__(self):
        self.values = []

    def put(self, value):
        self.values.append(value.clone())

    def end(self):
        self.values.append(None)


@pytest.mark.parametrize(
    "settings", [dict(eos_token_id="free", pad_token_id=0), dict(eos_token_id=None, max_time=600.0)],
    ids=["eos-padded", "no-eos-real-tokens"],
)
def test_streamer_gets_hf_tokens_of_every_step_with_processors(pair, settings):
    model, oracle = pair
    ids, mask = left_padded_batch()
    if settings["eos_token_id"] == "free":
        settings = dict(settings, eos_token_id=free_run_eos(oracle, ids, mask))
    got_streamer, expected_streamer = RecordingStreamer(), RecordingStreamer()
    call = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, repetition_penalty=1.2,
                **settings)
    got = model.generate(**call, streamer=got_streamer)
    expected = oracle.generate(**call, streamer=expected_streamer)
    assert torch.equal(got, expected)
    assert len(got_streamer.values) == len(expected_streamer.values)
    for mine, theirs in zip(got_streamer.values, expected_streamer.values):
        assert (mine is None and theirs is None) or torch.equal(mine, theirs)
