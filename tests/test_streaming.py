"""Streaming: HF's streamer call sequence from the accelerated generate, batch streaming, and LLM.stream."""
import copy
import threading

import pytest
import torch
from transformers import TextIteratorStreamer, TextStreamer
from transformers.generation.streamers import BaseStreamer

import hf_minivllm
from hf_minivllm import LLM, SamplingParams
from hf_minivllm.patches.streaming import BatchTextIteratorStreamer
from conftest import SMALL_ENGINE, left_padded_batch, tiny_model


class RecordingStreamer(BaseStreamer):
    """Keeps every call HF's generate makes on a streamer."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(("put", value.clone()))

    def end(self):
        self.calls.append(("end", None))


def assert_same_calls(mine, theirs):
    assert [name for name, _ in mine.calls] == [name for name, _ in theirs.calls]
    for (_, a), (_, b) in zip(mine.calls, theirs.calls):
        assert (a is None and b is None) or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))


@pytest.mark.parametrize("extra", [{}, dict(repetition_penalty=1.3), dict(return_dict_in_generate=True, output_scores=True)])
def test_streamer_gets_hf_call_sequence_for_a_batch_with_early_stops(extra):
    model = tiny_model("qwen3")
    oracle = copy.deepcopy(model)
    hf_minivllm.accelerate(model, **SMALL_ENGINE)
    ids, mask = left_padded_batch(seed=11)
    free = oracle.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)[:, ids.shape[1] :]
    settings = dict(max_new_tokens=10, do_sample=False, eos_token_id=[int(free[0, 1]), int(free[3, 4])], pad_token_id=0, **extra)
    mine, theirs = RecordingStreamer(), RecordingStreamer()
    model.generate(input_ids=ids, attention_mask=mask, streamer=mine, **settings)
    oracle.generate(input_ids=ids, attention_mask=mask, streamer=theirs, **settings)
    assert_same_calls(mine, theirs)
    assert mine.calls[0][1].shape == ids.shape and mine.calls[1][1].shape == (4,)
    assert hf_minivllm.stats(model)["fallbacks"] == 0


def chat_batch(tokenizer, questions):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True) for q in questions]
    return tokenizer(texts, return_tensors="pt", padding=True)


def test_text_streamers_print_and_iterate_like_hf(smollm2):
    model, tokenizer = smollm2
    oracle = copy.deepcopy(model)
    hf_minivllm.accelerate(model)
    batch = chat_batch(tokenizer, ["Write a short sentence about the sea."])
    settings = dict(max_new_tokens=24, do_sample=False)

    class Collecting(TextStreamer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.pieces = []

        def on_finalized_text(self, text, stream_end=False):
            self.pieces.append((text, stream_end))

    mine, theirs = Collecting(tokenizer, skip_prompt=True), Collecting(tokenizer, skip_prompt=True)
    out = model.generate(**batch, streamer=mine, **settings)
    oracle.generate(**batch, streamer=theirs, **settings)
    assert mine.pieces == theirs.pieces

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    thread = threading.Thread(target=model.generate, kwargs=dict(**batch, streamer=streamer, **settings))
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed == tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def test_text_streamer_refuses_a_batch_like_hf(smollm2):
    model, tokenizer = smollm2
    hf_minivllm.accelerate(model)
    batch = chat_batch(tokenizer, ["Hi.", "Hello there."])
    with pytest.raises(ValueError, match="batch size 1"):
        model.generate(**batch, max_new_tokens=4, streamer=TextStreamer(tokenizer))


def test_batch_streamer_yields_every_row_with_accelerated_and_plain_generate(smollm2):
    model, tokenizer = smollm2
    oracle = copy.deepcopy(model)
    hf_minivllm.accelerate(model)
    batch = chat_batch(tokenizer, ["What is the capital of France?", "Name three fruits.", "Say hello."])
    width = batch["input_ids"].shape[1]
    settings = dict(max_new_tokens=20, do_sample=False)
    texts = {}
    for name, target in (("accelerated", model), ("hf", oracle)):
        streamer = BatchTextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
        result = {}
        thread = threading.Thread(target=lambda: result.update(out=target.generate(**batch, streamer=streamer, **settings)))
        thread.start()
        rows = ["", "", ""]
        for row, text in streamer:
            rows[row] += text
        thread.join()
        assert rows == [tokenizer.decode(seq[width:], skip_special_tokens=True) for seq in result["out"]]
        texts[name] = rows
    assert texts["accelerated"] == texts["hf"]


def test_llm_stream_concatenates_to_generate_with_finish_reasons(smollm2):
    model, tokenizer = smollm2
    llm = LLM(model, tokenizer=tokenizer, num_kvcache_blocks=64)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in ["Reply with one word: yes.", "Write a long story about a dragon.", "What is 2 + 2?"]
    ]
    params = SamplingParams(temperature=0, max_tokens=40)
    expected = llm.generate(prompts, params, use_tqdm=False)
    texts, tokens, reasons, order = [""] * 3, [[] for _ in range(3)], [None] * 3, []
    for event in llm.stream(prompts, params):
        assert reasons[event.index] is None, "no event may follow a request's finish"
        texts[event.index] += event.text
        tokens[event.index] += event.token_ids
        reasons[event.index] = event.finish_reason
        order.append(event.index)
    assert texts == [o["text"] for o in expected]
    assert tokens == [o["token_ids"] for o in expected]
    assert reasons[1] == "length" and len(tokens[1]) == 40
    assert reasons[2] == "stop" and tokens[2][-1] in llm.engine.eos_token_ids
    assert set(order[:3]) == {0, 1, 2}, "all requests advance together, one continuous batch"


def test_a_stop_tokens_text_is_left_out_of_generate_and_stream(smollm2):
    """As in vLLM: the stop token that ended a request is in its token ids, not in its text."""
    model, tokenizer = smollm2
    llm = LLM(model, tokenizer=tokenizer, num_kvcache_blocks=64)
    greedy = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=12),
                          use_tqdm=False)[0]["token_ids"]
    stop = next(i for i in range(2, 12) if greedy[i] not in greedy[:i] and tokenizer.decode(greedy[i]).strip())
    params = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[greedy[stop]])
    out = llm.generate(["The capital of France is"], params, use_tqdm=False)[0]
    assert out["token_ids"] == greedy[: stop + 1]
    assert out["text"] == tokenizer.decode(greedy[:stop], skip_special_tokens=True)
    assert "".join(event.text for event in llm.stream(["The capital of France is"], params)) == out["text"]


def test_abandoned_stream_frees_the_engine(smollm2):
    model, tokenizer = smollm2
    llm = LLM(model, tokenizer=tokenizer, num_kvcache_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
    stream = llm.stream(["Tell me a story.", "Count to ten."], params)
    events = [next(stream), next(stream)]
    stream.close()  # returns once the unfinished requests are aborted
    manager = llm.engine.scheduler.block_manager
    assert not llm.engine.has_unfinished() and manager.num_free_blocks == manager.num_blocks
    assert llm.stats.generated_tokens < 2 * 300 and all(event.finish_reason is None for event in events)
    assert len(llm.generate(["Hi"], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]["token_ids"]) == 3
