"""The OpenAI-compatible server on the embedded SmolLM2, through the official ``openai`` client.

One server runs in this process (uvicorn in a thread, on a free port) for the whole module; the oracle is plain
transformers on an unpatched copy of the same model.
"""
from __future__ import annotations

import asyncio
import copy
import json
import socket
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn

from conftest import _smollm2, tiny_model
from hf_minivllm import LLM, SamplingParams
from hf_minivllm.models import loading
from hf_minivllm.models.loading import eos_token_ids_of
from hf_minivllm.serve import cli
from hf_minivllm.serve import AsyncLLM
from hf_minivllm.serve.app import build_app
from hf_minivllm.serve.protocol import CompletionRequest, SamplingDefaults

MODEL = "smollm2"
MAX_MODEL_LEN = 512
PROMPT = "The three most important things about the ocean are"
QUESTION = [{"role": "user", "content": "What is 2 + 3? Answer in one word."}]


class _Server:
    """uvicorn serving ``app`` from a thread, on a socket bound here (no port race)."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def served():
    """(AsyncLLM, server, HF oracle model, tokenizer) for the module."""
    model, tokenizer = _smollm2()
    engine = AsyncLLM(LLM(copy.deepcopy(model), tokenizer=tokenizer, max_model_len=MAX_MODEL_LEN,
                          num_kvcache_blocks=512))
    server = _Server(build_app(engine, MODEL))
    yield engine, server, model, tokenizer
    server.stop()
    engine.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1].url + "/v1", api_key="unused", max_retries=0, timeout=120)


_HF_GREEDY: dict[tuple, list[int]] = {}


def _hf_greedy(model, token_ids: list[int], max_new_tokens: int) -> list[int]:
    """HF's greedy tokens after ``token_ids``, generated once per model, prompt and length (the oracle's weights
    never change)."""
    key = (model, tuple(token_ids), max_new_tokens)
    if key not in _HF_GREEDY:
        mask = torch.ones(1, len(token_ids), dtype=torch.long)
        with torch.inference_mode():
            out = model.generate(torch.tensor([token_ids]), attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False)
        _HF_GREEDY[key] = out[0, len(token_ids):].tolist()
    return list(_HF_GREEDY[key])


def _chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def _joined(stream) -> tuple[dict[int, str], dict[int, str], dict | None]:
    """Texts and finish reasons per choice index of a completion or chat stream, and the usage chunk's usage."""
    texts, reasons, usage = {}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            piece = choice.text if hasattr(choice, "text") else (choice.delta.content or "")
            texts[choice.index] = texts.get(choice.index, "") + piece
            if choice.finish_reason is not None:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, usage


def _metrics(url: str) -> dict[str, float]:
    """The /metrics samples (name with labels -> value)."""
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _gauge(url: str, name: str) -> float:
    return _metrics(url)[f'hf_minivllm:{name}{{model_name="{MODEL}"}}']


def _wait_idle(url: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _gauge(url, "num_requests_running") or _gauge(url, "kv_cache_usage_perc"):
        assert time.monotonic() < deadline, "the aborted request still holds the engine's blocks"
        time.sleep(0.05)


def test_health_and_models(served, client):
    engine, server = served[:2]
    assert httpx.get(server.url + "/health").status_code == 200
    [model] = client.models.list().data
    assert model.id == MODEL and model.model_extra["max_model_len"] == MAX_MODEL_LEN


def test_greedy_completion_equals_hf_generate(served, client):
    _, _, model, tokenizer = served
    ids = tokenizer.encode(PROMPT)
    expected = _hf_greedy(model, ids, 24)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    assert out.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(expected)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0)
    assert by_ids.choices[0].text == out.choices[0].text


def test_greedy_chat_equals_hf_generate(served, client):
    _, _, model, tokenizer = served
    ids = _chat_ids(tokenizer, QUESTION)
    expected = _hf_greedy(model, ids, 40)
    out = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=40, temperature=0)
    assert out.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == ("stop" if expected[-1] in eos_token_ids_of(model) else "length")
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(expected)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stream_joined_equals_non_stream(client, endpoint):
    common = dict(model=MODEL, n=3, max_tokens=12, temperature=0.9, top_p=0.95, seed=1234, stop=[".", "\n\n"])
    if endpoint == "completions":
        create, extra = client.completions.create, dict(prompt=PROMPT)
    else:
        create, extra = client.chat.completions.create, dict(messages=QUESTION)
    full = create(**common, **extra)
    texts, reasons, usage = _joined(create(**common, **extra, stream=True, stream_options={"include_usage": True}))
    for choice in full.choices:
        text = choice.text if endpoint == "completions" else choice.message.content
        assert texts[choice.index] == text
        assert reasons[choice.index] == choice.finish_reason
        assert "." not in text and "\n\n" not in text
    assert usage == full.usage.model_dump()
    assert len({texts[i] for i in range(3)}) > 1, "the n choices of a seeded request should differ"


def test_sampling_options(served, client):
    tokenizer = served[3]
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    top1 = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.5,
                                     extra_body={"top_k": 1})
    assert top1.choices[0].text == greedy.choices[0].text
    seeded = [client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7,
                                        extra_body={"min_p": 0.05}).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]
    ids = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0)
    tokens = tokenizer.encode(PROMPT)
    greedy_ids = _hf_greedy(served[2], tokens, 12)
    logprobs = ids.choices[0].logprobs
    assert len(logprobs.tokens) == 12
    # The legacy API always lists the sampled token among the alternatives: logprobs=0 gives it alone.
    assert logprobs.top_logprobs == [{token: lp} for token, lp in zip(logprobs.tokens, logprobs.token_logprobs)]
    # stop_token_ids end at the given token (kept in the token count, not in the text); min_tokens holds it off.
    stop_id = greedy_ids[3]
    stopped = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                        extra_body={"stop_token_ids": [stop_id]})
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 4
    assert stopped.choices[0].text == tokenizer.decode(greedy_ids[:3], skip_special_tokens=True)
    held = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                     extra_body={"stop_token_ids": [stop_id], "min_tokens": 6})
    assert held.usage.completion_tokens >= 6


def test_max_tokens_and_ignore_eos(served, client):
    _, _, model, tokenizer = served
    expected = _hf_greedy(model, _chat_ids(tokenizer, QUESTION), 40)
    assert expected[-1] in eos_token_ids_of(model), "the question should be answered before 40 tokens"
    ignoring = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=40, temperature=0,
                                              extra_body={"ignore_eos": True})
    assert ignoring.usage.completion_tokens == 40 and ignoring.choices[0].finish_reason == "length"
    short = client.chat.completions.create(model=MODEL, messages=QUESTION, max_completion_tokens=2, temperature=0)
    assert short.usage.completion_tokens == 2 and short.choices[0].finish_reason == "length"


def test_stop_strings_are_cut_in_stream_and_whole(client):
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    stop = greedy[len(greedy) // 3 : len(greedy) // 3 + 4]  # a string that spans tokens, met once or more
    assert stop.strip()
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop, "zzzz"])
    assert out.choices[0].text == greedy[: greedy.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    texts, reasons, _ = _joined(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0,
                                                         stop=stop, stream=True))
    assert texts[0] == out.choices[0].text and reasons[0] == "stop"


def test_stop_strings_wait_for_min_tokens(client):
    """As in vLLM, a stop string that ends within the text of the first min_tokens tokens does not end the choice."""
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0)
    tokens = greedy.choices[0].logprobs.tokens
    held = len("".join(tokens[:4]))
    assert " " in tokens[0] and " " in "".join(tokens[4:])
    expected = greedy.choices[0].text[: greedy.choices[0].text.index(" ", held)]
    common = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, stop=" ", extra_body={"min_tokens": 4})
    whole = client.completions.create(**common).choices[0]
    assert (whole.text, whole.finish_reason) == (expected, "stop")
    texts, reasons, _ = _joined(client.completions.create(**common, stream=True))
    assert (texts[0], reasons[0]) == (expected, "stop")


def test_stop_strings_end_at_the_token_that_completes_them_however_late_the_reader(served):
    """A reader that falls behind gets many tokens at once; the choice still ends at the stop's token."""
    engine = served[0]
    text = engine.llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0]["text"]
    stop = text[len(text) // 4 : len(text) // 4 + 3]

    async def run(lag_s: float):
        stream = await engine.prepare(PROMPT, SamplingParams(temperature=0, max_tokens=30, logprobs=0), stop=[stop])
        stream.start()
        time.sleep(lag_s)  # blocks the event loop while the engine runs ahead
        ids, pieces, logprobs = [], [], 0
        async for output in stream:
            for delta in output.choices:
                ids += delta.token_ids
                pieces.append(delta.text)
                logprobs += len(delta.logprobs)
        return ids, "".join(pieces), logprobs, output.num_completion_tokens

    prompt_ids = engine.encode(PROMPT)
    on_time, late = asyncio.run(run(0.0)), asyncio.run(run(1.0))
    assert on_time == late and late[1] == text[: text.index(stop)]
    assert late[2] == late[3] == len(late[0]) < 30
    assert stop in engine.tokenizer.decode(prompt_ids + late[0])[len(engine.tokenizer.decode(prompt_ids)):]


def test_token_bytes_rebuild_multibyte_characters(served):
    engine, tokenizer = served[0], served[3]
    for text in ("\u00e9\U0001f600\u4f60", " na\u00efve caf\u00e9"):
        ids = tokenizer.encode(text)
        assert b"".join(engine.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_logprobs_match_hf(served, client):
    _, _, model, tokenizer = served
    ids = tokenizer.encode(PROMPT)
    with torch.inference_mode():
        hf = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    hf_logprobs = [torch.log_softmax(step[0].float(), -1) for step in hf.logits]
    generated = hf.sequences[0, len(ids):].tolist()
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    logprobs = out.choices[0].logprobs
    for position, (token, lp, top) in enumerate(zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs)):
        expected = hf_logprobs[position]
        assert token == tokenizer.decode([generated[position]])
        assert lp == pytest.approx(expected[generated[position]].item(), abs=1e-3)
        best = expected.topk(3)
        assert list(top) == [tokenizer.decode([i]) for i in best.indices.tolist()]
        assert list(top.values()) == pytest.approx(best.values.tolist(), abs=1e-3)
    streamed = {"tokens": [], "text_offset": []}
    for chunk in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                           stream=True):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                streamed["tokens"] += choice.logprobs.tokens
                streamed["text_offset"] += choice.logprobs.text_offset
    assert streamed == {"tokens": logprobs.tokens, "text_offset": logprobs.text_offset}
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.logprob - 1e-6
               for entry in content)
    assert "".join(entry.token for entry in content) == chat.choices[0].message.content


def test_sixteen_concurrent_streams(served, client):
    prompts = [f"Write a short sentence about the number {i}." for i in range(16)]
    alone = {i: client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0).choices[0].text
             for i, p in enumerate(prompts[:3])}

    def stream(i):
        texts, reasons, usage = _joined(client.completions.create(
            model=MODEL, prompt=prompts[i], max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        return texts[0], reasons[0], usage

    steps_before = served[0].llm.stats.steps
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(stream, range(16)))
    for i, (text, reason, usage) in enumerate(results):
        assert reason in ("stop", "length") and usage["completion_tokens"] > 0
        if i in alone:
            assert text == alone[i]
    total = sum(usage["completion_tokens"] for _, _, usage in results)
    assert served[0].llm.stats.steps - steps_before < total, "the concurrent streams should share steps"


def test_client_leaving_frees_its_blocks(served, client):
    url = served[1].url
    aborted = _metrics(url)[f'hf_minivllm:num_aborted_requests_total{{model_name="{MODEL}"}}']
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=400, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    for index, _ in enumerate(stream):
        if index == 3:
            break
    assert _gauge(url, "num_requests_running") == 1
    stream.close()
    _wait_idle(url)
    with pytest.raises(httpx.ReadTimeout):  # a whole (non-streamed) response the client stops waiting for
        httpx.post(url + "/v1/completions", timeout=1.0,
                   json={"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True})
    _wait_idle(url)
    assert _metrics(url)[f'hf_minivllm:num_aborted_requests_total{{model_name="{MODEL}"}}'] == aborted + 2
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4).usage.completion_tokens == 4


def test_api_key(served):
    engine = served[0]
    server = _Server(build_app(engine, MODEL, api_key="sesame"))
    try:
        wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as error:
            wrong.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        assert error.value.status_code == 401 and error.value.code == "invalid_api_key"
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert httpx.get(server.url + "/health").status_code == 200
        right = openai.OpenAI(base_url=server.url + "/v1", api_key="sesame", max_retries=0)
        assert right.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
    finally:
        server.stop()


def test_errors_are_openai_json_and_leave_the_server_usable(served, client):
    url = served[1].url
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    assert error.value.code == "model_not_found" and "no-such-model" in error.value.message
    long_prompt = "hello " * (MAX_MODEL_LEN + 10)
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=2)
    assert "maximum context length" in error.value.message and error.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_prompt}])
    assert error.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_MODEL_LEN)
    assert error.value.param == "max_tokens"
    bad = [dict(temperature=-1), dict(n=0), dict(top_p=0), dict(max_tokens=0), dict(presence_penalty=1.0),
           dict(logprobs=99), dict(extra_body={"top_k": -5}), dict(extra_body={"min_tokens": -1}),
           dict(seed=2**64), dict(extra_body={"top_k": 2**70}), dict(extra_body={"stop_token_ids": [2**64]}),
           dict(extra_body={"repetition_penalty": 1.2}), dict(extra_body={"include_stop_str_in_output": True}),
           dict(extra_body={"min_tokens": 5})]  # more than max_tokens=2
    for kwargs in bad:
        with pytest.raises(openai.BadRequestError) as error:
            client.completions.create(model=MODEL, prompt=PROMPT, **{"max_tokens": 2, **kwargs})
        name = next(iter(kwargs.get("extra_body", kwargs)))
        assert name in error.value.message and error.value.param == name, (kwargs, error.value.message)
    neutral = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2,
                                        extra_body={"repetition_penalty": 1.0, "skip_special_tokens": True})
    assert neutral.usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt=[[5, 6], [5, 2**40]], max_tokens=2)
    assert "prompt 1: token ids" in error.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    wrapped_seeds = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, n=2, seed=2**64 - 1)
    assert len(wrapped_seeds.choices) == 2
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt=[PROMPT] * 65, max_tokens=2, n=2)
    assert "choices" in error.value.message
    response = httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "error" in response.json()
    response = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": [[]], "max_tokens": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3).usage.completion_tokens == 3
    _wait_idle(url)


def test_chat_template_options(served, client):
    """vLLM's add_generation_prompt, continue_final_message and chat_template_kwargs reach the template; text
    parts of a message are joined one per line, as vLLM joins them."""
    from hf_minivllm.serve.app import _apply_chat_template
    from hf_minivllm.serve.protocol import ChatCompletionRequest

    tokenizer = served[3]
    draft = [*QUESTION, {"role": "assistant", "content": "The answer is"}]
    cases = [(QUESTION, {"add_generation_prompt": False}),
             (draft, {"add_generation_prompt": False, "continue_final_message": True})]
    for messages, options in cases:
        out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, extra_body=options)
        text = tokenizer.apply_chat_template(messages, tokenize=False, **options)
        assert out.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False)), options
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    joined = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=1)
    assert joined.usage.prompt_tokens == len(_chat_ids(tokenizer, [{"role": "user", "content": "Hello\nthere"}]))
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=draft, max_tokens=1,
                                       extra_body={"continue_final_message": True})
    assert error.value.param == "continue_final_message"
    with pytest.raises(openai.BadRequestError) as error:  # a client's own template is not rendered
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1,
                                       extra_body={"chat_template_kwargs": {"chat_template": "{{ 1 }}"}})
    assert error.value.param == "chat_template_kwargs" and "chat_template" in error.value.message
    thinking = copy.deepcopy(tokenizer)
    thinking.chat_template = "{% if enable_thinking %}<think>{% endif %}{{ messages[0]['content'] }}"
    body = ChatCompletionRequest(model=MODEL, messages=QUESTION, chat_template_kwargs={"enable_thinking": True})
    ids = _apply_chat_template(types.SimpleNamespace(tokenizer=thinking), body)
    assert ids == thinking.encode("<think>" + QUESTION[0]["content"], add_special_tokens=False)


def test_no_tokenizer_and_a_cache_smaller_than_max_model_len():
    """Without a tokenizer a text prompt is a 400. A KV cache of 32 tokens is the context a request may use (the
    model allows more): a prompt of 20 tokens without max_tokens gets the 12 that fit, not a 400 about a max_tokens
    the client never sent."""
    engine = AsyncLLM(LLM(tiny_model("llama"), num_kvcache_blocks=8, kvcache_block_size=4))
    server = _Server(build_app(engine, "tiny"))
    try:
        response = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "hello"})
        assert response.status_code == 400 and "tokenizer" in response.json()["error"]["message"]
        response = httpx.post(server.url + "/v1/completions",
                              json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
        assert engine.llm.config.max_model_len > 32
        assert httpx.get(server.url + "/v1/models").json()["data"][0]["max_model_len"] == 32
        response = httpx.post(server.url + "/v1/completions",
                              json={"model": "tiny", "prompt": list(range(5, 25)), "ignore_eos": True})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 12
        assert response.json()["choices"][0]["finish_reason"] == "length"
    finally:
        server.stop()
        engine.close()


def test_batch_of_prompts_keeps_order(client):
    prompts = ["One plus one is", "The sky is", "My favourite food is"]
    together = client.completions.create(model=MODEL, prompt=prompts, max_tokens=8, temperature=0, n=2)
    assert [choice.index for choice in together.choices] == list(range(6))
    for i, prompt in enumerate(prompts):
        alone = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
        assert together.choices[2 * i].text == together.choices[2 * i + 1].text == alone.choices[0].text


def test_metrics_report_requests_and_latencies(served, client):
    url = served[1].url
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    values = _metrics(url)
    label = f'model_name="{MODEL}"'
    assert values[f'hf_minivllm:request_success_total{{{label},finished_reason="length"}}'] >= 1
    assert values[f"hf_minivllm:time_to_first_token_seconds_count{{{label}}}"] >= 1
    assert values[f"hf_minivllm:inter_token_latency_seconds_count{{{label}}}"] >= 4
    assert values[f'hf_minivllm:time_to_first_token_seconds_bucket{{{label},le="+Inf"}}'] == \
        values[f"hf_minivllm:time_to_first_token_seconds_count{{{label}}}"]
    assert values[f"hf_minivllm:generation_tokens_total{{{label}}}"] >= 5
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert f"hf_minivllm:{gauge}{{{label}}}" in values


def test_async_llm_records_request_timings(served):
    engine = served[0]

    async def run():
        return [output async for output in engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=6), n=2)]

    outputs = asyncio.run(run())
    last = outputs[-1]
    assert last.finished and last.num_completion_tokens == 12
    assert [delta.finish_reason for delta in last.choices] == ["length", "length"]
    metrics = last.metrics
    assert metrics.queue_time >= 0 and metrics.time_to_first_token >= metrics.queue_time
    assert len(metrics.inter_token_latencies) == 10 and metrics.e2e_latency >= metrics.time_to_first_token


def test_sampling_defaults_come_from_what_the_generation_config_sets():
    """Only the fields the model's generation_config.json sets (HF's own top_k of 50 is no recommendation); HF's
    top_k 0 is no top-k; a value the engine cannot take is refused before the server starts."""
    from transformers import GenerationConfig

    qwen3_like = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95, top_k=20)
    assert SamplingDefaults.from_generation_config(qwen3_like) == SamplingDefaults(0.6, 0.95, 20, 0.0)
    assert SamplingDefaults.from_generation_config(GenerationConfig(bos_token_id=1)) == SamplingDefaults()
    assert SamplingDefaults.from_generation_config(GenerationConfig(top_k=0, min_p=0.1)).top_k == -1
    assert SamplingDefaults.from_generation_config(None) == SamplingDefaults()
    with pytest.raises(ValueError, match="generation_config.json.*min_p"):
        SamplingDefaults.from_generation_config(types.SimpleNamespace(to_diff_dict=lambda: {"min_p": 1.5}))
    request = CompletionRequest(model=MODEL, prompt="x", top_p=0.5)
    params = request.sampling_params(1, MAX_MODEL_LEN, None, 16, SamplingDefaults(0.6, 0.95, 20, 0.05))
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.6, 0.5, 20, 0.05)
    params = CompletionRequest(model=MODEL, prompt="x", temperature=0).sampling_params(1, MAX_MODEL_LEN, None, 16)
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.0, 1.0, -1, 0.0)


def test_cli_takes_sampling_defaults_from_the_model_unless_told_not_to(caplog):
    model = types.SimpleNamespace(generation_config=types.SimpleNamespace(
        to_diff_dict=lambda: {"temperature": 0.7, "repetition_penalty": 1.1}, repetition_penalty=1.1))
    with caplog.at_level("INFO", logger="hf_minivllm.serve"):
        assert cli.sampling_defaults(model, "auto") == SamplingDefaults(temperature=0.7)
    assert "'temperature': 0.7" in caplog.text and "repetition_penalty=1.1" in caplog.text
    assert cli.sampling_defaults(model, "none") == SamplingDefaults()
    assert cli.build_parser().parse_args(["serve"]).generation_config == "auto"


def test_a_request_without_sampling_fields_gets_the_servers_defaults(served):
    """A server whose defaults are greedy (temperature 0) answers a request that sets no temperature greedily."""
    engine, _, model, tokenizer = served
    server = _Server(build_app(engine, MODEL, sampling_defaults=SamplingDefaults(temperature=0.0)))
    try:
        out = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0).completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=12)
    finally:
        server.stop()
    ids = tokenizer.encode(PROMPT)
    assert out.choices[0].text == tokenizer.decode(_hf_greedy(model, ids, 12), skip_special_tokens=True)


def test_cli_rejects_bad_options_and_models(tmp_path, capsys):
    for args, message in [(["--max-model-len", "-3"], "--max-model-len must be a positive integer"),
                          (["--attention-backend", "nope"], "--attention-backend"),
                          (["--port", "0"], "--port")]:
        with pytest.raises(SystemExit) as exit_code:
            cli.main(["serve", *args])
        assert exit_code.value.code == 2 and message in capsys.readouterr().err
    assert cli.main(["serve", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    assert cli.main(["serve", str(tmp_path)]) == 1
    assert "could not load model" in capsys.readouterr().err


def test_cli_defaults_to_the_embedded_model(monkeypatch):
    embedded = _smollm2()  # loaded before the patch: _smollm2 itself calls load_embedded_model when not cached
    monkeypatch.setattr(loading, "load_embedded_model", lambda device=None: embedded)
    model, tokenizer, name = cli.load_model(None, "auto")
    assert (model, tokenizer) == embedded and name == "SmolLM2-135M-Instruct"


def test_cli_serves_a_model_folder(tmp_path):
    """``python -m hf_minivllm serve FOLDER`` end to end, on a tiny random Llama with SmolLM2's tokenizer."""
    tokenizer = _smollm2()[1]
    model = tiny_model("llama", vocab_size=len(tokenizer))
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    process = subprocess.Popen([sys.executable, "-m", "hf_minivllm", "serve", str(folder), "--port", str(port),
                                "--max-model-len", "128", "--num-kvcache-blocks", "64", "--log-level", "warning"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        cli_client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        [served_model] = cli_client.models.list().data
        assert served_model.id == "tiny-llama"
        out = cli_client.chat.completions.create(model=served_model.id, messages=QUESTION, max_tokens=4,
                                                 temperature=0, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 4
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_many_streams_cancelled_at_random_leave_the_engine_clean():
    """32 concurrent requests (n up to 3, stop strings, logprobs), a third of them cancelled mid-stream by their
    task: every finished one matches its solo run, nothing hangs, and afterwards no block is held."""
    import random

    engine = AsyncLLM(LLM(tiny_model("llama"), num_kvcache_blocks=256, kvcache_block_size=4, max_model_len=128))
    rng = random.Random(0)
    requests = [([rng.randrange(3, 300) for _ in range(rng.randrange(4, 40))],
                 SamplingParams(temperature=0, max_tokens=rng.randrange(4, 30), ignore_eos=True,
                                logprobs=rng.choice([None, 2])), rng.randrange(1, 4), i % 3 == 0)
                for i in range(32)]

    async def run(prompt, params, n, cancel):
        tokens = [[] for _ in range(n)]
        async for output in engine.generate(prompt, params, n=n):
            for delta in output.choices:
                tokens[delta.index] += delta.token_ids
            if cancel and sum(map(len, tokens)) >= 3:
                raise asyncio.CancelledError
        return tokens

    async def main():
        tasks = [asyncio.ensure_future(run(*request)) for request in requests]
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=120)

    results = asyncio.run(main())
    try:
        for (prompt, params, n, cancel), result in zip(requests, results):
            if cancel:
                assert isinstance(result, asyncio.CancelledError)
                continue
            solo = engine.llm.generate([prompt], params, use_tqdm=False)[0]["token_ids"]
            assert result == [solo] * n
        deadline = time.monotonic() + 10
        while engine.llm.engine.has_unfinished():
            assert time.monotonic() < deadline, "cancelled requests still run"
            time.sleep(0.05)
        blocks = engine.llm.engine.scheduler.block_manager
        assert blocks.num_free_blocks == blocks.num_blocks
        assert engine.metrics.requests_aborted == sum(cancel for *_, cancel in requests)
    finally:
        engine.close()


def test_a_failed_request_is_answered_as_an_openai_error():
    """A request the engine aborts (a model whose logits left nothing to sample from, say) gets error JSON with
    status 500, as a streamed one gets an error event."""
    from hf_minivllm.serve import app as app_module

    class StaysConnected:
        async def receive(self):
            await asyncio.sleep(3600)

    async def fails():
        raise RuntimeError("request 3: its next-token logits hold NaN")

    response = asyncio.run(app_module._unless_disconnected(StaysConnected(), fails()))
    assert response.status_code == 500
    assert json.loads(response.body)["error"]["message"] == "request 3: its next-token logits hold NaN"
