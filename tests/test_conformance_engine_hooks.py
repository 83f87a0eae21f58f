"""The engine's per-request ``SamplingParams.step_hook`` contract, without transformers' generate in the way."""
import pytest
import torch

from hf_minivllm import LLM, SamplingParams
from conftest import SMALL_ENGINE, tiny_model

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]


class BanAndStop:
    """Bans one token everywhere and ends a request once it generated ``stop_after`` tokens; records its calls."""

    def __init__(self, banned, stop_after):
        self.banned, self.stop_after = banned, stop_after
        self.logits_calls, self.stop_calls = [], []

    def process_logits(self, seqs, logits):
        self.logits_calls.append([seq.seq_id for seq in seqs])
        logits = logits.clone()
        logits[:, self.banned] = float("-inf")
        return logits

    def should_stop(self, seqs):
        self.stop_calls.append([seq.seq_id for seq in seqs])
        return [seq.num_completion_tokens >= self.stop_after for seq in seqs]


@pytest.fixture(scope="module")
def llm():
    return LLM(tiny_model("llama"), **SMALL_ENGINE)


def test_hook_sees_only_its_requests_and_others_are_untouched(llm):
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    reference = llm.generate(PROMPTS, greedy, use_tqdm=False)
    banned = reference[1]["token_ids"][0]
    hook = BanAndStop(banned, stop_after=5)
    hooked = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, step_hook=hook)
    seqs = llm.engine.generate(PROMPTS, [greedy, hooked, greedy, hooked])
    assert [seq.completion_token_ids for seq in (seqs[0], seqs[2])] == [reference[0]["token_ids"], reference[2]["token_ids"]]
    for seq in (seqs[1], seqs[3]):
        assert banned not in seq.completion_token_ids
        assert seq.num_completion_tokens == 5 and seq.finish_reason.value == "stop"
    hooked_ids = {seqs[1].seq_id, seqs[3].seq_id}
    assert all(set(call) <= hooked_ids for call in hook.logits_calls + hook.stop_calls)
    assert [len(call) for call in hook.logits_calls] == [2] * 5, "requests sharing a hook come in one call per step"
    assert llm.engine.num_hooked_requests == 0


def test_abandoned_stream_resets_the_hook_count(llm):
    hook = BanAndStop(banned=3, stop_after=100)
    stream = llm.stream(PROMPTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, step_hook=hook))
    next(stream)
    stream.close()
    assert llm.engine.num_hooked_requests == 0 and not llm.engine.has_unfinished()
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0]["token_ids"]) == 3


def test_step_hook_must_have_both_methods():
    with pytest.raises(ValueError, match="step_hook"):
        SamplingParams(step_hook=lambda seqs, logits: logits)
    assert SamplingParams(step_hook=BanAndStop(0, 1)).step_hook is not None


def test_sampled_rows_come_from_the_processed_logits(llm):
    class OnlyToken:
        def __init__(self, token):
            self.token = token

        def process_logits(self, seqs, logits):
            forced = torch.full_like(logits, float("-inf"))
            forced[:, self.token] = 0.0
            return forced

        def should_stop(self, seqs):
            return [False] * len(seqs)

    params = SamplingParams(temperature=1.0, top_k=5, max_tokens=4, ignore_eos=True, step_hook=OnlyToken(42))
    assert all(o["token_ids"] == [42] * 4 for o in llm.generate(PROMPTS, params, use_tqdm=False))
