"""LLM: the offline API (nano-vllm / vLLM style). Prompts in, ``{"text", "token_ids"}`` dicts out, in order."""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence as SequenceOf
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from hf_minivllm.config import Config
from hf_minivllm.engine.llm_engine import LLMEngine, StepResult
from hf_minivllm.engine.sequence import Sequence
from hf_minivllm.models.adapter import build_decoder, load_hf_model
from hf_minivllm.models.loading import eos_token_ids_of, load_tokenizer
from hf_minivllm.sampling_params import SamplingParams

Prompt = str | SequenceOf[int]


@dataclass
class StreamOutput:
    """One event of ``LLM.stream``: the text and tokens request ``index`` gained this step.

    ``finish_reason`` ("stop" or "length") is set on a request's last event. The ``text`` of a request's events
    concatenates to the ``"text"`` that ``LLM.generate`` returns for it.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas whose concatenation is ``decode(all ids)``.

    Each step decodes only a short window: the tokens after ``prefix_offset``, compared with the same window without
    the tokens after ``read_offset`` (the approach of vLLM and TGI), so the context that decides spacing is kept and
    the cost per token stays constant. A delta ending in an incomplete UTF-8 character is held back until it completes.
    """

    def __init__(self, tokenizer: Any, **decode_kwargs: Any):
        self.tokenizer = tokenizer
        self.decode_kwargs = decode_kwargs
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, token_ids: SequenceOf[int]) -> str:
        return self.tokenizer.decode(token_ids, **self.decode_kwargs)

    def _pending(self, token_ids: SequenceOf[int]) -> str:
        prefix_text = self._decode(token_ids[self.prefix_offset : self.read_offset])
        return self._decode(token_ids[self.prefix_offset :])[len(prefix_text) :]

    def step(self, token_ids: SequenceOf[int]) -> str:
        """The new text of ``token_ids`` (all tokens so far) since the last call; may be empty."""
        if self.tokenizer is None:
            return ""
        delta = self._pending(token_ids)
        if not delta or delta.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        return delta

    def flush(self, token_ids: SequenceOf[int]) -> str:
        """Everything not yet returned, incomplete characters included (call once, after the last token)."""
        if self.tokenizer is None:
            return ""
        delta = self._pending(token_ids)
        self.prefix_offset = self.read_offset = len(token_ids)
        return delta


class LLM:
    """``LLM(path_or_loaded_model, **config)``.

    A path is loaded with ``transformers`` (local files only) onto the GPU when there is one; a loaded HF model is
    used where it is, sharing its weights. ``tokenizer=`` is needed for string prompts and ``"text"`` outputs
    unless it can be loaded from the path.
    """

    def __init__(self, model: Any, tokenizer: Any = None, **config: Any):
        unknown = set(config) - set(Config.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown LLM config argument(s) {sorted(unknown)}; valid: {sorted(Config.__dataclass_fields__)}")
        self.config = Config(model=model, **config)
        if isinstance(model, str):
            hf_model = load_hf_model(model)
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
        else:
            hf_model = model
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.config.fit_to_model(getattr(hf_model.config, "max_position_embeddings", None))
        self.model = build_decoder(hf_model)
        self.engine = LLMEngine(self.model, self.config, eos_token_ids_of(hf_model, tokenizer))

    @property
    def stats(self):
        return self.engine.stats

    def _encode(self, prompt: Prompt, index: int) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt {index} is a string but this LLM has no tokenizer; pass tokenizer= or token ids")
            return list(self.tokenizer.encode(prompt))
        if not isinstance(prompt, (list, tuple)):
            raise ValueError(f"prompt {index} must be a string or a list of token ids, got {type(prompt).__name__}")
        return list(prompt)

    def _decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _requests(
        self,
        prompts: Prompt | SequenceOf[Prompt],
        sampling_params: SamplingParams | SequenceOf[SamplingParams] | None,
    ) -> tuple[list[list[int]], list[SamplingParams]]:
        """Prompts as token id lists and one SamplingParams per prompt (a single prompt may be given bare)."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        sampling_params = list(sampling_params)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(sampling_params)} sampling params")
        return [self._encode(prompt, index) for index, prompt in enumerate(prompts)], sampling_params

    def generate(
        self,
        prompts: Prompt | SequenceOf[Prompt],
        sampling_params: SamplingParams | SequenceOf[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[dict]:
        """Generate for every prompt; returns ``{"text", "token_ids"}`` (completion only) per prompt, in order."""
        token_ids, sampling_params = self._requests(prompts, sampling_params)
        if not token_ids:
            return []
        seqs = self.generate_sequences(token_ids, sampling_params, use_tqdm)
        return [{"text": self._decode(seq.completion_token_ids), "token_ids": seq.completion_token_ids} for seq in seqs]

    def stream(
        self,
        prompts: Prompt | SequenceOf[Prompt],
        sampling_params: SamplingParams | SequenceOf[SamplingParams] | None = None,
    ) -> Iterator[StreamOutput]:
        """Generate like ``generate``, yielding a ``StreamOutput`` per request each time it gets a token.

        All prompts run as one continuous batch; events come in step order, and within a step in batch order. A
        request's last event carries its ``finish_reason``. Leaving the loop early drops the unfinished requests.
        """
        token_ids, sampling_params = self._requests(prompts, sampling_params)
        seqs = self.engine.add_requests(token_ids, sampling_params)
        index_of = {seq.seq_id: index for index, seq in enumerate(seqs)}
        detokenizers = [IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True) for _ in seqs]
        emitted = [0] * len(seqs)
        with closing(self.engine.steps()) as results:
            for result in results:
                for seq in result.updated:
                    index = index_of.get(seq.seq_id)
                    if index is None:
                        continue
                    completion = seq.completion_token_ids
                    text = detokenizers[index].step(completion)
                    finish_reason = seq.finish_reason.value if seq.is_finished else None
                    if finish_reason is not None:
                        text += detokenizers[index].flush(completion)
                    yield StreamOutput(index, text, completion[emitted[index] :], finish_reason)
                    emitted[index] = len(completion)

    def generate_sequences(
        self, token_ids: list[list[int]], sampling_params: list[SamplingParams], use_tqdm: bool = False
    ) -> list[Sequence]:
        """The engine's finished sequences for already-tokenized prompts (used by the HF ``generate`` patch too)."""
        progress = _Progress(len(token_ids)) if use_tqdm else None
        try:
            return self.engine.generate(token_ids, sampling_params, on_step=progress.update if progress else None)
        finally:
            if progress is not None:
                progress.close()


class _Progress:
    """tqdm bar over finished requests, with live prefill and decode tokens per second."""

    def __init__(self, total: int):
        self.bar = tqdm(total=total, desc="Generating", dynamic_ncols=True)
        self.last = time.perf_counter()
        self.prefill_rate = 0.0
        self.decode_rate = 0.0

    def update(self, result: StepResult) -> None:
        now = time.perf_counter()
        rate = result.num_tokens / max(now - self.last, 1e-9)
        self.last = now
        if result.is_prefill:
            self.prefill_rate = rate
        else:
            self.decode_rate = rate
        self.bar.set_postfix(prefill=f"{self.prefill_rate:.0f} tok/s", decode=f"{self.decode_rate:.0f} tok/s", refresh=False)
        self.bar.update(len(result.finished))

    def close(self) -> None:
        self.bar.close()
