"""The OpenAI-compatible HTTP server (FastAPI): completions, chat completions, models, health and metrics.

Every request is validated and tokenized before anything is queued, so a bad one is a 400 (OpenAI's error JSON)
and never a half-started stream. Streams are server-sent events ending with ``data: [DONE]``. A client that goes
away (mid-stream or while waiting for a whole response) aborts its request, which frees its KV blocks.
"""
from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
import contextlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from hf_minivllm.engine.llm_engine import EngineClosed
from hf_minivllm.models.adapter import UnsupportedModel
from hf_minivllm.serve.async_llm import AsyncLLM, ChoiceDelta, RequestOutput, RequestStream, TokenLogprob
from hf_minivllm.serve.protocol import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    MAX_CHOICES,
    ChatCompletionRequest,
    CompletionRequest,
    InvalidRequest,
    SamplingDefaults,
    error_body,
)

logger = logging.getLogger(__name__)


class _Unauthorized(Exception):
    """A /v1 request without the server's API key."""


def _error(status: int, message: str, error_type: str, param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, error_type, code or status, param), status_code=status)


def build_app(engine: AsyncLLM, model_name: str, api_key: str | None = None,
              sampling_defaults: SamplingDefaults = SamplingDefaults()) -> FastAPI:
    """The server's app around one engine. ``api_key``: required as ``Authorization: Bearer <key>`` on /v1/.
    ``sampling_defaults``: what a request gets for the sampling fields it leaves out."""
    app = FastAPI(title="hf-minivllm", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        first = problems[0] if problems else {}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        message = "; ".join(f"{'.'.join(str(p) for p in item.get('loc', ()) if p != 'body') or 'body'}: "
                            f"{item.get('msg')}" for item in problems)
        return _error(400, message or "invalid request body", "invalid_request_error", param)

    @app.exception_handler(InvalidRequest)
    async def _invalid_request(request: Request, error: InvalidRequest) -> JSONResponse:
        return _error(400, str(error), "invalid_request_error", error.param)

    @app.exception_handler(EngineClosed)
    async def _closed(request: Request, error: EngineClosed) -> JSONResponse:
        return _error(503, str(error), "service_unavailable")

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(request: Request, error: _Unauthorized) -> JSONResponse:
        return _error(401, "Incorrect API key provided", "invalid_request_error", code="invalid_api_key")

    # A dependency of the /v1 routes rather than an HTTP middleware: Starlette's middleware relays every streamed
    # chunk through a memory stream and a task of its own, which cost as much per chunk as producing it.
    async def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise _Unauthorized

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    def check_model(name: str) -> JSONResponse | None:
        if name != model_name:
            return _error(404, f"The model `{name}` does not exist (this server has `{model_name}`)",
                          "invalid_request_error", "model", "model_not_found")
        return None

    @app.get("/health")
    async def health() -> Response:
        if engine.llm.loop.closed:
            return _error(503, "the engine is closed", "service_unavailable")
        return Response(status_code=200)

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "hf-minivllm", "max_model_len": engine.max_model_len}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(engine.metrics.render(model_name, engine.engine_gauges()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @v1.post("/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        if (missing := check_model(body.model)) is not None:
            return missing
        body.check_supported()
        prompts = body.prompts()
        if len(prompts) * body.n > MAX_CHOICES:
            raise InvalidRequest(f"{len(prompts)} prompts x n={body.n} choices exceed the {MAX_CHOICES} choices one "
                                 "request may ask for", "prompt")
        prompts = [_encode(engine, prompt, index) for index, prompt in enumerate(prompts)]
        streams = await _prepare(engine, body, prompts, body.logprobs, DEFAULT_COMPLETION_MAX_TOKENS, "cmpl",
                                 sampling_defaults)
        response = _CompletionResponse(engine, body, model_name, streams)
        return await _respond(raw, body.stream, response)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        if (missing := check_model(body.model)) is not None:
            return missing
        body.check_supported()
        prompt = _apply_chat_template(engine, body)
        streams = await _prepare(engine, body, [prompt], body.num_logprobs, None, "chatcmpl", sampling_defaults)
        response = _ChatResponse(engine, body, model_name, streams)
        return await _respond(raw, body.stream, response)

    app.include_router(v1)
    return app


def _encode(engine: AsyncLLM, prompt: str | list[int], index: int) -> list[int]:
    if isinstance(prompt, str):
        try:
            return engine.encode(prompt)
        except ValueError as error:  # e.g. text sent to a model served without a tokenizer
            raise InvalidRequest(str(error), "prompt") from None
    if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise InvalidRequest(f"prompt {index} must be a non-empty string or list of token ids", "prompt")
    return prompt


def _apply_chat_template(engine: AsyncLLM, body: ChatCompletionRequest) -> list[int]:
    tokenizer = engine.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("this model's tokenizer has no chat template; use /v1/completions", "messages")
    messages = [message.for_template() for message in body.messages]
    try:  # vLLM's chat_template_kwargs reach the template too (e.g. Qwen3's enable_thinking)
        text = tokenizer.apply_chat_template(messages, **{
            **(body.chat_template_kwargs or {}), "tokenize": False,
            "add_generation_prompt": body.add_generation_prompt,
            "continue_final_message": body.continue_final_message})
    except Exception as error:  # noqa: BLE001 - the template's own complaint (e.g. roles out of order)
        raise InvalidRequest(f"the chat template could not render these messages: {error}", "messages") from None
    # The rendered template carries its own special tokens (BOS included when the model uses one).
    return list(tokenizer.encode(text, add_special_tokens=False))


async def _prepare(engine: AsyncLLM, body: Any, prompts: list[list[int]], logprobs: int | None,
                   default_max_tokens: int | None, prefix: str, defaults: SamplingDefaults) -> list[RequestStream]:
    """One validated (not yet queued) request per prompt; nothing is queued unless every prompt is valid."""
    request_id = f"{prefix}-{uuid.uuid4().hex}"
    streams = []
    for index, token_ids in enumerate(prompts):
        params = body.sampling_params(len(token_ids), engine.max_model_len, logprobs, default_max_tokens, defaults)
        try:
            streams.append(await engine.prepare(token_ids, params, n=body.n, stop=body.stop_strings,
                                                request_id=f"{request_id}-{index}"))
        except (InvalidRequest, UnsupportedModel):  # the latter: the served model changed; not the client's fault
            raise
        except ValueError as error:  # the engine saw one prompt at a time: name this one's place in the batch
            raise InvalidRequest(re.sub(r"^prompt 0\b", f"prompt {index}", str(error)), body.prompt_field) from None
    return streams


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Events of every prompt's stream as they come, tagged with the prompt's index; aborts all on exit."""
    try:
        for stream in streams:
            stream.start()
        if len(streams) == 1:
            async for output in streams[0]:
                yield 0, output
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for output in stream:
                    await queue.put((index, output, None))
            except Exception as error:  # noqa: BLE001 - handed to the consumer below
                await queue.put((index, None, error))

        tasks = [asyncio.ensure_future(pump(index, stream)) for index, stream in enumerate(streams)]
        try:
            remaining = len(streams)
            while remaining:
                index, output, error = await queue.get()
                if error is not None:
                    raise error
                remaining -= output.finished
                yield index, output
        finally:
            for task in tasks:
                task.cancel()
    finally:
        for stream in streams:
            stream.abort()


class _Response(ABC):
    """One API call's output in either shape: accumulated into one JSON body, or as server-sent event chunks."""

    object_name = ""
    chunk_object_name = ""

    def __init__(self, engine: AsyncLLM, body: Any, model_name: str, streams: list[RequestStream]):
        self.engine, self.body, self.model_name, self.streams = engine, body, model_name, streams
        self.id = streams[0].request_id.rsplit("-", 1)[0]
        self.created = int(time.time())
        self.n = body.n

    def usage(self) -> dict:
        prompt = sum(stream.num_prompt_tokens for stream in self.streams)
        completion = sum(choice.num_tokens for stream in self.streams for choice in stream.choices.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def header(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model_name}

    @abstractmethod
    def stream_choice(self, index: int, delta: ChoiceDelta) -> dict | None:
        """A choice's delta as a stream chunk entry, or None when it carries nothing to send."""

    def first_chunks(self) -> list[dict]:
        return []

    @abstractmethod
    def full_choice(self, index: int, text: str, logprobs: list[TokenLogprob] | None, finish: str | None) -> dict:
        """A finished choice as an entry of the whole response."""

    async def body_json(self) -> dict:
        texts: dict[int, list[str]] = {}
        logprobs: dict[int, list[TokenLogprob] | None] = {}
        finish: dict[int, str | None] = {}
        async for prompt_index, output in _merged(self.streams):
            for delta in output.choices:
                index = prompt_index * self.n + delta.index
                texts.setdefault(index, []).append(delta.text)
                if delta.logprobs is not None:
                    logprobs.setdefault(index, []).extend(delta.logprobs)
                if delta.finish_reason is not None:
                    finish[index] = delta.finish_reason
        choices = [self.full_choice(index, "".join(texts.get(index, [])), logprobs.get(index), finish.get(index))
                   for index in range(len(self.streams) * self.n)]
        return {**self.header(self.object_name), "choices": choices, "usage": self.usage()}

    async def events(self) -> AsyncIterator[str]:
        include_usage = self.body.include_usage
        try:
            for chunk in self.first_chunks():
                yield _sse(chunk)
            async for prompt_index, output in _merged(self.streams):
                choices = [choice for delta in output.choices
                           if (choice := self.stream_choice(prompt_index * self.n + delta.index, delta)) is not None]
                if choices:
                    chunk = {**self.header(self.chunk_object_name), "choices": choices}
                    if include_usage:
                        chunk["usage"] = None
                    yield _sse(chunk)
            if include_usage:
                yield _sse({**self.header(self.chunk_object_name), "choices": [], "usage": self.usage()})
        except Exception as error:  # noqa: BLE001 - the stream has started: the error goes in it, as vLLM does
            logger.exception("a streamed request failed")
            yield _sse(error_body(str(error), "internal_server_error", 500))
        yield "data: [DONE]\n\n"


class _CompletionResponse(_Response):
    object_name = chunk_object_name = "text_completion"

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.text_offsets: dict[int, int] = {}  # per choice: where its next token's text starts

    def _logprobs(self, index: int, entries: list[TokenLogprob] | None) -> dict | None:
        """The legacy logprobs object; ``top_logprobs`` always holds the sampled token as well (up to k + 1
        entries), as OpenAI's legacy API and vLLM give it."""
        if entries is None:
            return None
        token_text = self.engine.token_text
        tokens = [token_text(entry.token_id) for entry in entries]
        offsets, offset = [], self.text_offsets.get(index, 0)
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        self.text_offsets[index] = offset
        top = []
        for token, entry in zip(tokens, entries):
            alternatives = {token_text(t): lp for t, lp in entry.top}
            alternatives.setdefault(token, entry.logprob)
            top.append(alternatives)
        return {"tokens": tokens, "token_logprobs": [entry.logprob for entry in entries], "top_logprobs": top,
                "text_offset": offsets}

    def full_choice(self, index: int, text: str, logprobs: list[TokenLogprob] | None, finish: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": self._logprobs(index, logprobs), "finish_reason": finish}

    def stream_choice(self, index: int, delta: ChoiceDelta) -> dict | None:
        if not delta.text and delta.finish_reason is None and not delta.logprobs:
            return None
        return {"index": index, "text": delta.text, "logprobs": self._logprobs(index, delta.logprobs),
                "finish_reason": delta.finish_reason}


class _ChatResponse(_Response):
    object_name, chunk_object_name = "chat.completion", "chat.completion.chunk"

    def _logprobs(self, entries: list[TokenLogprob] | None) -> dict | None:
        if entries is None:
            return None
        token_text = self.engine.token_text

        token_bytes = self.engine.token_bytes

        def item(token_id: int, logprob: float) -> dict:
            return {"token": token_text(token_id), "logprob": logprob, "bytes": list(token_bytes(token_id))}

        return {"content": [{**item(entry.token_id, entry.logprob),
                             "top_logprobs": [item(t, lp) for t, lp in entry.top]} for entry in entries]}

    def first_chunks(self) -> list[dict]:
        return [{**self.header(self.chunk_object_name),
                 "choices": [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for index in range(len(self.streams) * self.n)]}]

    def full_choice(self, index: int, text: str, logprobs: list[TokenLogprob] | None, finish: str | None) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": self._logprobs(logprobs), "finish_reason": finish}

    def stream_choice(self, index: int, delta: ChoiceDelta) -> dict | None:
        if not delta.text and delta.finish_reason is None and not delta.logprobs:
            return None
        return {"index": index, "delta": {"content": delta.text} if delta.text else {},
                "logprobs": self._logprobs(delta.logprobs), "finish_reason": delta.finish_reason}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _respond(raw: Request, stream: bool, response: _Response) -> Response:
    if stream:
        return StreamingResponse(response.events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await _unless_disconnected(raw, response.body_json())


async def _unless_disconnected(raw: Request, work: Awaitable[dict]) -> Response:
    """The whole response once ``work`` is done; if the client leaves first, the work is cancelled (which aborts
    its requests) and nobody is answered. A failure of the work (a request the engine aborted, such as one whose
    logits left nothing to sample from) is answered as an OpenAI error body, status 500."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(raw))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():  # the client left, or this handler itself was cancelled (server shutdown)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return Response(status_code=499)
    error = task.exception()
    if error is not None and not isinstance(error, (InvalidRequest, EngineClosed)):  # those have their handlers
        logger.error("a request failed", exc_info=error)
        return _error(500, str(error), "internal_server_error")
    return JSONResponse(task.result())


async def _disconnected(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass
