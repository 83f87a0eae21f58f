"""The OpenAI request bodies the server accepts, and their translation into engine sampling parameters.

Fields follow OpenAI's API; ``top_k``, ``min_p``, ``min_tokens``, ``ignore_eos`` and ``stop_token_ids`` are the
extra parameters vLLM accepts too (the openai client sends them through ``extra_body``), and so are the chat
template's ``add_generation_prompt``, ``continue_final_message`` and ``chat_template_kwargs``. Parameters the engine
cannot honour (penalties, logit bias, tools, echo, vLLM's other extras when set) are refused with a 400 naming them
rather than ignored; other unknown fields are ignored, as vLLM ignores them. A sampling field a request leaves out
takes the server's ``SamplingDefaults``: the model's own generation_config.json values where it sets them (as vLLM
serves by default), else OpenAI's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from hf_minivllm.sampling_params import MAX_LOGPROBS, SamplingParams

# Completions without max_tokens generate this many tokens (OpenAI's default for the legacy endpoint).
DEFAULT_COMPLETION_MAX_TOKENS = 16
MAX_CHOICES = 128  # per request: n, or prompts x n for a batch of prompts


# generation_config.json fields that a request's sampling defaults come from.
_DEFAULTED_FIELDS = ("temperature", "top_p", "top_k", "min_p")


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request that leaves a sampling field out gets (OpenAI's defaults unless the model's say otherwise)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0

    @classmethod
    def from_generation_config(cls, generation_config: Any) -> SamplingDefaults:
        """The values a model's generation config (``transformers.GenerationConfig``) sets explicitly: model
        authors tune them for their model (Qwen3: temperature 0.6, top_p 0.95, top_k 20). Only what the file sets
        counts (``to_diff_dict``): HF's own default top_k of 50 is no recommendation. ``do_sample`` is not
        read, as vLLM does not read it: a request asks for greedy with temperature 0. Values the engine cannot
        take raise ``ValueError`` naming the file, before the server starts."""
        if generation_config is None:
            return cls()
        given = generation_config.to_diff_dict()
        values = {name: given[name] for name in _DEFAULTED_FIELDS if given.get(name) is not None}
        if values.get("top_k") == 0:  # HF's "no top-k"
            values["top_k"] = -1
        defaults = cls(**values)
        try:
            SamplingParams(temperature=defaults.temperature, top_p=defaults.top_p, top_k=defaults.top_k,
                           min_p=defaults.min_p)
        except ValueError as error:
            raise ValueError(f"the model's generation_config.json sets a default the engine cannot take: "
                             f"{str(error).replace('SamplingParams.', '')}") from None
        return defaults

    def changed(self) -> dict[str, float]:
        """The fields that differ from OpenAI's defaults (what the server logs at start)."""
        return {name: getattr(self, name) for name in _DEFAULTED_FIELDS
                if getattr(self, name) != getattr(SamplingDefaults, name)}


class InvalidRequest(ValueError):
    """A request the server refuses with 400; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="allow")  # kept aside (``model_extra``) to refuse the extras below
    # vLLM's extra parameters that change the answer and that this server cannot honour, with their neutral values:
    # a request that sets one otherwise is refused, not answered as if it had not.
    unsupported_extras: ClassVar[dict[str, Any]] = {
        "repetition_penalty": 1.0, "length_penalty": 1.0, "use_beam_search": False, "include_stop_str_in_output": False,
        "skip_special_tokens": True, "spaces_between_special_tokens": True, "prompt_logprobs": None,
        "allowed_token_ids": None, "bad_words": None, "truncate_prompt_tokens": None, "logits_processors": None,
        "guided_json": None, "guided_regex": None, "guided_choice": None, "guided_grammar": None,
        "structured_outputs": None,
    }

    model: str
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def check_supported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise InvalidRequest(f"{name} is not supported by this server (only 0)", name)
        if self.logit_bias:
            raise InvalidRequest("logit_bias is not supported by this server", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed with stream=true", "stream_options")
        for name, value in (self.model_extra or {}).items():
            if name in self.unsupported_extras and value not in (None, self.unsupported_extras[name], [], {}):
                raise InvalidRequest(f"{name} is not supported by this server", name)

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _max_tokens(self, num_prompt_tokens: int, max_model_len: int, default: int | None) -> int:
        room = max_model_len - num_prompt_tokens
        if room <= 0:
            raise InvalidRequest(f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
                                 f"{num_prompt_tokens} tokens; shorten the prompt", self.prompt_field)
        wanted = self.max_tokens if self.max_tokens is not None else min(default or room, room)
        if wanted > room:
            raise InvalidRequest(f"This model's maximum context length is {max_model_len} tokens; the prompt has "
                                 f"{num_prompt_tokens} tokens and max_tokens asks for {wanted} more", "max_tokens")
        return wanted

    prompt_field: ClassVar[str] = "prompt"  # the field a too-long prompt is reported under

    def sampling_params(self, num_prompt_tokens: int, max_model_len: int, logprobs: int | None,
                        default_max_tokens: int | None,
                        defaults: SamplingDefaults = SamplingDefaults()) -> SamplingParams:
        """The engine's parameters for one choice, ``defaults`` for the sampling fields the request leaves out;
        invalid values raise ``InvalidRequest``."""
        max_tokens = self._max_tokens(num_prompt_tokens, max_model_len, default_max_tokens)
        try:
            return SamplingParams(
                temperature=defaults.temperature if self.temperature is None else self.temperature,
                top_p=defaults.top_p if self.top_p is None else self.top_p,
                top_k=defaults.top_k if self.top_k is None else self.top_k,
                min_p=defaults.min_p if self.min_p is None else self.min_p,
                seed=self.seed,
                max_tokens=max_tokens,
                min_tokens=self.min_tokens,
                ignore_eos=self.ignore_eos,
                stop_token_ids=list(self.stop_token_ids or []),
                logprobs=logprobs,
            )
        except ValueError as error:  # "SamplingParams.<field> must ...": the request's field of the same name
            field = re.match(r"SamplingParams\.(\w+)", str(error))
            raise InvalidRequest(str(error).replace("SamplingParams.", ""), field and field[1]) from None


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise InvalidRequest("echo is not supported by this server", "echo")
        if self.suffix:
            raise InvalidRequest("suffix is not supported by this server", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequest("best_of is not supported by this server (it may only equal n)", "best_of")

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: one string, strings, one token-id list, or token-id lists."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise InvalidRequest("prompt must not be empty", "prompt")
        if all(isinstance(item, int) for item in prompt):
            return [list(prompt)]
        return list(prompt)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as a chat template expects it: text parts joined into one string, one per line (as vLLM
        joins them, so that both servers render the same prompt)."""
        content = self.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "text":
                    raise InvalidRequest(f"message content parts of type {part.get('type')!r} are not supported "
                                         "(text only)", "messages")
                parts.append(part.get("text", ""))
            content = "\n".join(parts)
        return {**(self.model_extra or {}), "role": self.role, "content": content or ""}


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    prompt_field: ClassVar[str] = "messages"
    unsupported_extras: ClassVar[dict[str, Any]] = {**_GenerationRequest.unsupported_extras, "echo": False,
                                                    "chat_template": None}
    # apply_chat_template's own parameters, which chat_template_kwargs must not reach.
    template_call_arguments: ClassVar[frozenset[str]] = frozenset({
        "conversation", "chat_template", "tools", "documents", "add_generation_prompt", "continue_final_message",
        "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
        "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs"})

    def check_supported(self) -> None:
        super().check_supported()
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise InvalidRequest("max_tokens and max_completion_tokens differ; give one", "max_tokens")
            self.max_tokens = self.max_completion_tokens
        if self.tools or self.tool_choice not in (None, "none"):
            raise InvalidRequest("tools are not supported by this server", "tools")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise InvalidRequest("response_format other than text is not supported by this server", "response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs=true", "top_logprobs")
        if self.continue_final_message and self.add_generation_prompt:
            raise InvalidRequest("continue_final_message needs add_generation_prompt=false", "continue_final_message")
        reserved = sorted(set(self.chat_template_kwargs or {}) & self.template_call_arguments)
        if reserved:  # the template's own variables only: not a template of the client's, nor the call's settings
            raise InvalidRequest(f"chat_template_kwargs may not set {', '.join(reserved)}", "chat_template_kwargs")

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def error_body(message: str, error_type: str, code: int | str | None = None, param: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
