"""The engine's torch sampler (``hf_minivllm.layers.sampler``): top-k, top-p and min-p draw what HF's warpers keep,
whether a batch samples from its top-k candidates alone or from the whole vocabulary."""
from __future__ import annotations

import functools

import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from hf_minivllm import LLM, SamplingParams
from hf_minivllm.engine.sequence import Sequence
from hf_minivllm.layers import sampler
from hf_minivllm.layers.sampler import SamplingTensors, sample
from conftest import tiny_model

VOCAB = 300
# (temperature, top_k, top_p, min_p): top-p alone, min-p alone, and top-k alone, side by side in one batch.
SETTINGS = [(0.7, 20, 0.9, 0.0), (1.3, 50, 1.0, 0.05), (0.5, 5, 1.0, 0.0)]


def hf_probabilities(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """What HF's sampling keeps of ``logits``: its warpers in generate's order, then a softmax."""
    scores = logits[None].clone()
    warpers = [TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k)]
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p > 0.0:
        warpers.append(MinPLogitsWarper(min_p))
    for warper in warpers:
        scores = warper(None, scores)
    return scores.softmax(-1)[0]


def batch(rows_per_setting: int, max_top_k: int | None, greedy_rows: int = 0) -> tuple[torch.Tensor, SamplingTensors]:
    """One logits row per setting repeated ``rows_per_setting`` times (then ``greedy_rows`` rows at temperature 0 and
    top-k off), with the engine's per-row tensors."""
    logits = torch.randn(len(SETTINGS), VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    rows = [setting for setting in SETTINGS for _ in range(rows_per_setting)] + [(0.0, VOCAB, 1.0, 0.0)] * greedy_rows
    row_logits = torch.cat([logits.repeat_interleave(rows_per_setting, 0), logits[:1].expand(greedy_rows, -1)])
    temperatures, top_ks, top_ps, min_ps = (torch.tensor(column) for column in zip(*rows))
    params = SamplingTensors(temperatures=temperatures.float(), top_ks=top_ks, top_ps=top_ps.float(),
                             min_ps=min_ps.float(), all_greedy=False, any_greedy=greedy_rows > 0, use_top_k=True,
                             use_top_p=True, use_min_p=True, max_top_k=max_top_k)
    return row_logits, params


@pytest.mark.parametrize("path", ["top-k candidates", "whole vocabulary"])
def test_draws_follow_hf_warpers(path, monkeypatch):
    if path == "top-k candidates":
        def no_vocabulary_sort(*args, **kwargs):
            raise AssertionError("the batch should have sampled from its top-k candidates")
        monkeypatch.setattr(sampler, "apply_top_k_top_p_min_p", no_vocabulary_sort)
    rows = 6000
    logits, params = batch(rows, max_top_k=50 if path == "top-k candidates" else None, greedy_rows=3)
    torch.manual_seed(1)
    tokens = sample(logits, params)
    assert torch.equal(tokens[-3:], logits[-3:].argmax(-1)), "greedy rows take the argmax"
    for index, (temperature, top_k, top_p, min_p) in enumerate(SETTINGS):
        drawn = tokens[index * rows:(index + 1) * rows]
        expected = hf_probabilities(logits[index * rows], temperature, top_k, top_p, min_p)
        assert expected[drawn].min() > 0, "a token HF's warpers remove was drawn"
        frequencies = torch.bincount(drawn, minlength=VOCAB).float() / rows
        assert (frequencies - expected).abs().max() < 0.025


def test_candidates_only_up_to_their_limit_and_never_for_seeded_rows(monkeypatch):
    """Many candidates (or none known), or a seeded row, keep the whole-vocabulary draw: a seed then gives the same
    tokens whatever the batch around it."""
    calls = []
    original = sampler._sample_top_k_candidates
    monkeypatch.setattr(sampler, "_sample_top_k_candidates", lambda *args: calls.append(1) or original(*args))
    logits, params = batch(4, max_top_k=sampler.CANDIDATES_MAX + 1)
    sample(logits, params)
    logits, params = batch(4, max_top_k=None)
    sample(logits, params)
    logits, params = batch(4, max_top_k=50)
    params.generators = {0: torch.Generator().manual_seed(3)}
    sample(logits, params)
    assert not calls
    params.generators = {}
    sample(logits, params)
    assert calls == [1]


@pytest.mark.parametrize("max_top_k", [3, None], ids=["top-k candidates", "whole vocabulary"])
def test_top_k_keeps_the_tokens_tied_with_the_kth_as_hf_does(max_top_k, monkeypatch):
    """16-bit logits tie often. HF's top-k keeps every token scoring at least the k-th: here top_k=3 keeps six."""
    path = sampler._sample_top_k_candidates if max_top_k else sampler.apply_top_k_top_p_min_p
    calls = []
    monkeypatch.setattr(sampler, path.__name__, lambda *args: calls.append(1) or path(*args))
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(4)) * 0.5
    logits[[7, 40, 41, 90, 200, 299]] = torch.tensor([4.0, 3.5, 3.0, 3.0, 3.0, 3.0])
    rows = 8000
    params = SamplingTensors(temperatures=torch.ones(rows), top_ks=torch.full((rows,), 3), top_ps=torch.ones(rows),
                             min_ps=torch.zeros(rows), all_greedy=False, any_greedy=False, use_top_k=True,
                             use_top_p=False, use_min_p=False, max_top_k=max_top_k)
    torch.manual_seed(2)
    drawn = sample(logits.expand(rows, -1).contiguous(), params)
    expected = hf_probabilities(logits, 1.0, 3, 1.0, 0.0)
    assert int((expected > 0).sum()) == 6
    assert expected[drawn].min() > 0
    frequencies = torch.bincount(drawn, minlength=VOCAB).float() / rows
    assert (frequencies - expected).abs().max() < 0.02
    assert calls == [1], "the batch took the other path"



def test_a_greedy_rows_filters_leave_the_sampled_rows_path_alone():
    """HF's generation config gives greedy calls a top_k of 50. Sharing a step with them, temperature-only rows keep
    the one-pass path (no filter flags) and top-k rows their candidates (max_top_k over sampled rows only)."""
    runner = LLM(tiny_model("qwen3"), num_kvcache_blocks=16).engine.runner
    greedy = SamplingParams(temperature=0, top_k=50, top_p=0.5, min_p=0.1)

    def tensors(*params):
        return runner._sampling_tensors([Sequence([1, 2], p, runner.block_size) for p in params])

    plain = tensors(greedy, SamplingParams(temperature=0.7))
    assert not (plain.use_top_k or plain.use_top_p or plain.use_min_p) and plain.any_greedy
    top_k = tensors(greedy, SamplingParams(temperature=0.7, top_k=7))
    assert top_k.use_top_k and top_k.max_top_k == 7 and not top_k.use_top_p


@pytest.mark.parametrize("max_top_k", [50, None], ids=["top-k candidates", "whole vocabulary"])
def test_sampled_rows_without_a_distribution_come_back_marked(max_top_k):
    """NaN or +inf among a sampled row's logits, or nothing finite, leaves no distribution (HF's sampling raises):
    the row comes back NO_DISTRIBUTION. A greedy row takes its argmax whatever its logits, as HF's greedy search."""
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(5))
    logits[0, 17] = float("nan")
    logits[1, 3] = float("inf")
    logits[2] = float("-inf")
    logits[4, 17] = float("nan")
    temperatures = torch.tensor([0.8, 0.8, 0.8, 0.8, 0.0])
    params = SamplingTensors(temperatures=temperatures, top_ks=torch.full((5,), 50 if max_top_k else VOCAB),
                             top_ps=torch.full((5,), 0.9), min_ps=torch.zeros(5), all_greedy=False, any_greedy=True,
                             use_top_k=max_top_k is not None, use_top_p=True, use_min_p=False, max_top_k=max_top_k)
    tokens = sample(logits, params)
    assert tokens[:3].tolist() == [sampler.NO_DISTRIBUTION] * 3
    assert 0 <= tokens[3] < VOCAB and tokens[4] == logits[4].argmax()


def test_a_sampled_request_without_a_distribution_fails_as_in_hf_and_the_engine_goes_on():
    model = tiny_model("qwen3")
    with torch.no_grad():
        model.lm_head.weight[5] = float("nan")  # every next-token row holds a NaN
    prompt = torch.tensor([[3, 4, 6]])
    with pytest.raises(RuntimeError):
        model.generate(prompt, do_sample=True, max_new_tokens=2)  # HF: "probability tensor contains ... nan"
    llm = LLM(model, num_kvcache_blocks=64)
    for params in (SamplingParams(temperature=0.7, max_tokens=3), SamplingParams(temperature=0.7, top_k=5, max_tokens=3),
                   SamplingParams(temperature=0.7, top_p=0.9, max_tokens=3)):
        with pytest.raises(RuntimeError, match="no distribution to sample from"):
            llm.generate([prompt[0].tolist()], params, use_tqdm=False)
    greedy = llm.generate([prompt[0].tolist()], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert greedy[0]["token_ids"] == model.generate(prompt, do_sample=False, max_new_tokens=3)[0, 3:].tolist()


def test_a_temperature_under_the_greedy_bound_decodes_greedily():
    """Logits divided by a temperature that float32 rounds to 0 would be inf and NaN: such a request, and any under
    GREEDY_BELOW, decodes as temperature 0 does, on every sampling path."""
    from hf_minivllm.sampling_params import GREEDY_BELOW

    model = tiny_model("qwen3")
    llm = LLM(model, num_kvcache_blocks=64)
    prompt = [[3, 4, 6, 9]]
    greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]["token_ids"]
    for params in (SamplingParams(temperature=1e-50, max_tokens=6), SamplingParams(temperature=GREEDY_BELOW / 2,
                   top_p=0.9, max_tokens=6), SamplingParams(temperature=1e-40, top_k=5, seed=3, max_tokens=6)):
        assert llm.generate(prompt, params, use_tqdm=False)[0]["token_ids"] == greedy


def test_rows_taken_in_chunks_draw_and_score_as_in_one(monkeypatch):
    """The whole-vocabulary draw and the log-probabilities take their rows a chunk at a time (``row_chunks``): a
    batch cut into chunks of two rows, the last one short, gives seeded requests of different settings the same
    tokens and log-probabilities as one chunk, and a greedy row among them its argmax. Some rows ask for no
    log-probabilities (the chunks of those that do are not the batch's), and min_tokens changes the logits in
    place after their copy is taken."""
    llm = LLM(tiny_model("qwen3"), num_kvcache_blocks=64)
    prompts = [[row + 1, row + 2, 2 * row + 3] for row in range(7)]
    params = [SamplingParams(temperature=0.6 + 0.1 * row, top_p=0.7 + 0.04 * row, min_p=0.01 * (row % 3), seed=row,
                             max_tokens=5, min_tokens=3, logprobs=None if row in (1, 4) else 3) for row in range(7)]
    params[3] = SamplingParams(temperature=0, max_tokens=5, logprobs=2)
    chunk_sizes = []
    whole_vocabulary = sampler._sample_whole_vocabulary
    monkeypatch.setattr(sampler, "_sample_whole_vocabulary",
                        lambda logits, *args: chunk_sizes.append(len(logits)) or whole_vocabulary(logits, *args))

    def run() -> list[tuple[list[int], list]]:
        return [(seq.completion_token_ids, seq.logprobs) for seq in llm.generate_sequences(prompts, params)]

    in_one = run()
    assert set(chunk_sizes) == {7}
    chunk_sizes.clear()
    monkeypatch.setattr(sampler, "CHUNK_ELEMENTS", 2 * llm.engine.runner.model.vocab_size + 1)
    assert run() == in_one
    assert chunk_sizes[:4] == [2, 2, 2, 1]
    assert len({tuple(tokens) for tokens, _ in in_one}) > 1
    assert [len(logprobs or []) for _, logprobs in in_one] == [5, 0, 5, 5, 0, 5, 5]
    # each row its own number of alternatives, though the step computes the most any row asks for
    alternatives = [{len(top) for _, top in logprobs or []} for _, logprobs in in_one]
    assert alternatives == [{3}, set(), {3}, {2}, set(), {3}, {3}]
    greedy_tokens, greedy_logprobs = in_one[3]
    assert [max(alternatives, key=alternatives.get) for _, alternatives in greedy_logprobs] == greedy_tokens


def test_an_empty_batch_samples_nothing():
    logits, params = batch(1, max_top_k=None)
    assert sample(logits[:0], params.rows(slice(0, 0))).shape == (0,)


@pytest.mark.parametrize("max_top_k", [10, None], ids=["top-k candidates", "whole vocabulary"])
def test_top_p_cuts_through_tied_tokens_where_hf_does(max_top_k, monkeypatch):
    """Four tied tokens and top_p=0.6: HF's and vLLM's top-p sort ascending and drop from the least likely end, so
    of the tied ones the first in their sort goes. Their sort of a vocabulary on CUDA is stable (so is HF's warper
    here once the sort is): it drops column 3 and keeps 50, 120 and 299. Cutting from the other end kept 3 and
    dropped 299: as likely a token, but never one HF keeps."""
    path = sampler._sample_top_k_candidates if max_top_k else sampler.apply_top_k_top_p_min_p
    calls = []
    monkeypatch.setattr(sampler, path.__name__, lambda *args: calls.append(1) or path(*args))
    logits = torch.full((VOCAB,), -20.0)
    logits[[3, 50, 120, 299]] = 2.0
    rows = 300
    params = SamplingTensors(temperatures=torch.ones(rows), top_ks=torch.full((rows,), max_top_k or VOCAB),
                             top_ps=torch.full((rows,), 0.6), min_ps=torch.zeros(rows), all_greedy=False,
                             any_greedy=False, use_top_k=max_top_k is not None, use_top_p=True, use_min_p=False,
                             max_top_k=max_top_k)
    torch.manual_seed(3)
    drawn = sample(logits.expand(rows, -1).contiguous(), params)
    stable_sort = functools.partial(torch.sort, stable=True)
    monkeypatch.setattr(torch, "sort", stable_sort)
    hf_kept = torch.isfinite(TopPLogitsWarper(0.6)(None, logits[None].clone())[0]).nonzero().flatten().tolist()
    assert hf_kept == [50, 120, 299]
    assert set(drawn.tolist()) == {50, 120, 299}
    assert calls == [1], "the batch took the other path"


def test_a_row_at_top_p_1_keeps_every_token_beside_a_top_p_row():
    """HF adds no top-p warper at top_p=1. In a batch where another row uses top-p, such a row must not lose its
    tail: here its first token's probability rounds to 1.0 in float32, so a mass-before-the-token test at 1 would
    cut the other 299 (and a seeded request's draw would depend on who shares its step)."""
    logits = torch.zeros(2, VOCAB)
    logits[:, 0] = 30.0
    params = SamplingTensors(temperatures=torch.ones(2), top_ks=torch.full((2,), VOCAB),
                             top_ps=torch.tensor([1.0, 0.5]), min_ps=torch.zeros(2), all_greedy=False,
                             any_greedy=False, use_top_k=False, use_top_p=True, use_min_p=False)
    kept = sampler.apply_top_k_top_p_min_p(logits, params.temperatures, params)
    assert torch.equal(kept[0], logits[0])
    assert torch.isinf(kept[1, 1:]).all() and kept[1, 0] == 30.0
