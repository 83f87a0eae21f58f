"""Conformance: ``accelerate(model).generate`` against an unpatched copy made before accelerating (the oracle).

Every served setting is token-exact under greedy decoding on every tiny family; outputs have HF's shapes, row
grouping and padding; scores and logits match per step; settings the engine cannot serve warn once and return HF's
own result. Engine runs use a small KV cache so the tests stay fast.
"""
import copy
import warnings

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

import hf_minivllm
from hf_minivllm.patches.model import state_of
from conftest import FAMILIES, SMALL_ENGINE, left_padded_batch, tiny_model

MAX_NEW = 12


class Pair:
    """An accelerated tiny model, its unpatched oracle, a left-padded batch and the oracle's free greedy run."""

    def __init__(self, family):
        self.model = tiny_model(family)
        self.oracle = copy.deepcopy(self.model)
        hf_minivllm.accelerate(self.model, **SMALL_ENGINE)
        self.ids, self.mask = left_padded_batch()
        free = self.oracle.generate(input_ids=self.ids, attention_mask=self.mask, max_new_tokens=MAX_NEW, do_sample=False)
        self.free = free[:, self.ids.shape[1] :]
        self.requests = []
        engine = state_of(self.model).llm.engine
        new_sequences = engine.new_sequences

        def spy(prompts, params):
            self.requests.append(params)
            return new_sequences(prompts, params)

        engine.new_sequences = spy

    def both(self, oracle_settings=None, **settings):
        """(accelerated output, oracle output) on the batch; the accelerated call must not fall back or warn.

        The oracle gets ``oracle_settings`` when given (e.g. the settings without a field that should not matter).
        """
        fallbacks = hf_minivllm.stats(self.model)["fallbacks"]
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            got = self.model.generate(input_ids=self.ids, attention_mask=self.mask, **settings)
        assert hf_minivllm.stats(self.model)["fallbacks"] == fallbacks, "the engine should have served this call"
        oracle_settings = settings if oracle_settings is None else oracle_settings
        expected = self.oracle.generate(input_ids=self.ids, attention_mask=self.mask, **oracle_settings)
        return got, expected

    def used_step_hook(self) -> bool:
        return any(params.step_hook is not None for params in self.requests[-1])


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    return Pair(request.param)


def greedy_cases(free):
    """Settings built from tokens the free run really produces, so each one changes the output."""
    first, second, third = int(free[0, 0]), int(free[1, 2]), int(free[2, 4])
    bigram = [int(free[1, 3]), int(free[1, 4])]
    eos = sorted({int(free[0, 2]), int(free[2, 5])})
    return {
        "repetition_penalty": dict(repetition_penalty=1.3),
        "repetition_penalty_below_one": dict(repetition_penalty=0.8),
        "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
        "bad_words_ids": dict(bad_words_ids=[[first], bigram]),
        "suppress_tokens": dict(suppress_tokens=[first, second, third]),
        "begin_suppress_tokens": dict(begin_suppress_tokens=[int(free[row, 0]) for row in range(4)]),
        "sequence_bias": dict(sequence_bias={(second,): -10.0, (first,): 5.0}),
        "encoder_repetition_penalty": dict(encoder_repetition_penalty=1.5),
        "encoder_no_repeat_ngram_size": dict(encoder_no_repeat_ngram_size=2),
        "forced_eos_token_id": dict(forced_eos_token_id=third, eos_token_id=third, pad_token_id=0),
        "exponential_decay_length_penalty": dict(exponential_decay_length_penalty=(2, 1.5), eos_token_id=eos),
        "remove_invalid_values": dict(remove_invalid_values=True),
        "renormalize_logits": dict(renormalize_logits=True),
        "eos_list_and_pad": dict(eos_token_id=eos, pad_token_id=7),
        "min_new_tokens": dict(eos_token_id=eos, pad_token_id=0, min_new_tokens=6),
        "min_length": dict(eos_token_id=eos, pad_token_id=0, min_length=14),
        "max_length": dict(max_length=17),
        "min_new_tokens_with_penalty": dict(eos_token_id=eos, min_new_tokens=4, repetition_penalty=1.2),
        "use_cache_false": dict(use_cache=False),
        "early_stopping_ignored": dict(early_stopping=True),
        "sampling_at_top_p_zero": dict(do_sample=True, top_p=0.0),  # HF keeps the most likely token alone
    }


CASE_NAMES = list(greedy_cases(torch.zeros(4, MAX_NEW, dtype=torch.long)))
ENGINE_ONLY_CASES = {"eos_list_and_pad", "min_new_tokens", "min_length", "max_length", "use_cache_false",
                     "early_stopping_ignored", "sampling_at_top_p_zero"}


@pytest.mark.parametrize("case", CASE_NAMES)
def test_greedy_setting_is_token_exact(pair, case):
    settings = {"max_new_tokens": MAX_NEW, "do_sample": False, **greedy_cases(pair.free)[case]}
    if "max_length" in settings:
        del settings["max_new_tokens"]
    got, expected = pair.both(**settings)
    assert torch.equal(got, expected)
    assert pair.used_step_hook() == (case not in ENGINE_ONLY_CASES)


def test_rows_padded_and_shapes_when_rows_stop_early(pair):
    eos = greedy_cases(pair.free)["eos_list_and_pad"]["eos_token_id"]
    got, expected = pair.both(max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos, repetition_penalty=1.1, pad_token_id=5)
    assert got.shape == expected.shape and torch.equal(got, expected)


def test_scores_and_logits_match_per_step_including_finished_rows(pair):
    eos = greedy_cases(pair.free)["eos_list_and_pad"]["eos_token_id"]
    settings = dict(
        max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos, pad_token_id=0, no_repeat_ngram_size=3,
        return_dict_in_generate=True, output_scores=True, output_logits=True,
    )
    got, expected = pair.both(**settings)
    assert type(got) is type(expected)
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.scores) == len(expected.scores) == got.sequences.shape[1] - pair.ids.shape[1]
    for mine, theirs in zip(got.scores, expected.scores):
        assert mine.shape == theirs.shape == (4, 320)
        assert torch.allclose(mine, theirs, atol=1e-4, rtol=1e-4)
    for mine, theirs in zip(got.logits, expected.logits):
        assert torch.allclose(mine, theirs, atol=1e-4, rtol=1e-4)
    assert got.attentions is None and got.hidden_states is None and got.past_key_values is None
    assert not got.scores[0].is_inference()


def test_renormalized_scores_and_engine_only_return_dict(pair):
    got, expected = pair.both(max_new_tokens=6, do_sample=False, renormalize_logits=True, return_dict_in_generate=True, output_scores=True)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got.scores, expected.scores))
    got, expected = pair.both(max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected.sequences) and got.scores is None and expected.scores is None
    assert not pair.used_step_hook()


def test_sampling_with_processors_is_reproducible_and_grouped(pair):
    settings = dict(
        do_sample=True, temperature=0.9, top_k=30, typical_p=0.9, repetition_penalty=1.2, num_return_sequences=3,
        max_new_tokens=8, return_dict_in_generate=True, output_scores=True,
    )
    torch.manual_seed(0)
    first = pair.model.generate(input_ids=pair.ids, attention_mask=pair.mask, **settings)
    torch.manual_seed(0)
    second = pair.model.generate(input_ids=pair.ids, attention_mask=pair.mask, **settings)
    assert torch.equal(first.sequences, second.sequences)
    assert first.sequences.shape == (12, pair.ids.shape[1] + 8)
    for row in range(4):
        assert torch.equal(first.sequences[3 * row : 3 * row + 3, : pair.ids.shape[1]], pair.ids[row].expand(3, -1))
    assert all(step.shape == (12, 320) for step in first.scores)
    chosen = first.sequences[:, pair.ids.shape[1] :]
    eos = pair.model.generation_config.eos_token_id
    for row in range(12):  # every sampled token up to the row's eos was allowed by HF's own warpers
        for step, token in enumerate(chosen[row].tolist()):
            assert torch.isfinite(first.scores[step][row, token])
            if token == eos:
                break


class BanArgmaxOnEvenRows(LogitsProcessor):
    """Depends on the row index and the length, and edits the scores in place: exactly HF's batch must be seen."""

    def __call__(self, input_ids, scores):
        for row in range(scores.shape[0]):
            if (row + input_ids.shape[1]) % 2 == 0:
                scores[row, scores[row].argmax()] = float("-inf")
        return scores


class StopAfterToken(StoppingCriteria):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_user_logits_processor_and_stopping_criteria(pair):
    stop = int(pair.free[2, 3])
    settings = dict(max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    got = pair.model.generate(
        input_ids=pair.ids, attention_mask=pair.mask, logits_processor=LogitsProcessorList([BanArgmaxOnEvenRows()]),
        stopping_criteria=StoppingCriteriaList([StopAfterToken(stop)]), **settings,
    )
    expected = pair.oracle.generate(
        input_ids=pair.ids, attention_mask=pair.mask, logits_processor=LogitsProcessorList([BanArgmaxOnEvenRows()]),
        stopping_criteria=StoppingCriteriaList([StopAfterToken(stop)]), **settings,
    )
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got.logits, expected.logits))


def test_prefix_allowed_tokens_fn_sees_batch_ids(pair):
    def allowed(batch_id, sentence):
        return list(range(10 + 20 * batch_id, 40 + 20 * batch_id))

    got, expected = pair.both(max_new_tokens=8, do_sample=False, prefix_allowed_tokens_fn=allowed)
    assert torch.equal(got, expected)


def test_model_generation_config_and_object_precedence(pair):
    config = GenerationConfig(max_new_tokens=5, do_sample=False, repetition_penalty=1.5, pad_token_id=0)
    pair.model.generation_config.no_repeat_ngram_size = 2
    pair.oracle.generation_config.no_repeat_ngram_size = 2
    try:
        for settings in (dict(generation_config=config), dict(generation_config=config, max_new_tokens=9, repetition_penalty=1.1), dict(max_new_tokens=7, do_sample=False)):
            got, expected = pair.both(**settings)
            assert torch.equal(got, expected)
    finally:
        pair.model.generation_config.no_repeat_ngram_size = None
        pair.oracle.generation_config.no_repeat_ngram_size = None


@pytest.mark.parametrize(
    "settings, reason",
    [
        (dict(num_beams=2), "num_beams"),
        (dict(guidance_scale=1.5), "guidance_scale"),
        (dict(output_attentions=True, return_dict_in_generate=True), "output_attentions"),
        (dict(prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens"),
    ],
)
def test_fallback_warns_once_and_returns_hf_result(settings, reason):
    pair = Pair("llama")
    call = dict(input_ids=pair.ids[1:2], attention_mask=pair.mask[1:2], max_new_tokens=5, do_sample=False, **settings)
    expected = pair.oracle.generate(**call)
    with pytest.warns(UserWarning, match=reason):
        got = pair.model.generate(**call)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="hf-minivllm")
        again = pair.model.generate(**call)
    for output in (got, again):
        sequences = output if torch.is_tensor(output) else output.sequences
        assert torch.equal(sequences, expected if torch.is_tensor(expected) else expected.sequences)
    assert hf_minivllm.stats(pair.model)["fallbacks"] == 2


def test_stop_strings_are_token_exact_on_smollm2(smollm2):
    model, tokenizer = smollm2
    oracle = copy.deepcopy(model)
    hf_minivllm.accelerate(model)
    questions = ["What is the capital of France?", "Name a primary colour.", "Count from one to five."]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True) for q in questions]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    free = oracle.generate(**batch, max_new_tokens=20, do_sample=False)
    words = tokenizer.decode(free[2, batch["input_ids"].shape[1] :], skip_special_tokens=True).split()
    settings = dict(max_new_tokens=20, do_sample=False, stop_strings=[words[2], "Paris"], tokenizer=tokenizer)
    expected = oracle.generate(**batch, **settings)
    got = model.generate(**batch, **settings)
    assert torch.equal(got, expected)
    width, pad = batch["input_ids"].shape[1], model.generation_config.pad_token_id
    assert (got[:, width:] == pad).sum() > (free[:, width:] == pad).sum(), "a stop string should end a row early"
    assert hf_minivllm.stats(model)["fallbacks"] == 0
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(**batch, max_new_tokens=4, stop_strings=["x"])


@pytest.mark.parametrize(
    "engine",
    [dict(num_kvcache_blocks=14, kvcache_block_size=4), dict(num_kvcache_blocks=256, kvcache_block_size=4, max_num_batched_tokens=10)],
    ids=["preempted-rows", "chunked-prefill"],
)
def test_processors_and_scores_exact_when_rows_fall_out_of_step(engine):
    """Preemption and chunked prefill advance rows of one call in different steps; HF's view must not change."""
    model = tiny_model("qwen3")
    oracle = copy.deepcopy(model)
    hf_minivllm.accelerate(model, **engine)
    if "max_num_batched_tokens" in engine:  # fit_to_model raises the budget to max_model_len; force small chunks
        state_of(model).llm.engine.scheduler.max_num_batched_tokens = engine["max_num_batched_tokens"]
    ids, mask = left_padded_batch(seed=12)
    settings = dict(
        max_new_tokens=MAX_NEW, do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=2,
        return_dict_in_generate=True, output_scores=True,
    )
    got = model.generate(input_ids=ids, attention_mask=mask, **settings)
    expected = oracle.generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got.scores, expected.scores))
    stats = hf_minivllm.stats(model)
    assert stats["fallbacks"] == 0
    if "max_num_batched_tokens" not in engine:
        assert stats["preemptions"] > 0
