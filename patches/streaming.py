"""Streaming a whole batch through HF's streamer protocol (``put(prompt ids)``, ``put([batch] tokens)``, ``end()``).

HF's ``TextStreamer`` and ``TextIteratorStreamer`` refuse batches; ``BatchTextIteratorStreamer`` takes any batch
and yields ``(row, text)`` deltas. It relies on nothing but HF's call sequence, so it works the same with the
engine's ``generate`` and with transformers' own.
"""
from __future__ import annotations

from queue import Queue
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from hf_minivllm.llm import IncrementalDetokenizer


class BatchTextIteratorStreamer(BaseStreamer):
    """Iterate over ``(row, text)`` pairs while ``generate`` runs (typically in another thread).

    A row's texts concatenate to ``tokenizer.decode(row tokens, **decode_kwargs)`` of what it streamed: the prompt
    (unless ``skip_prompt``) and every generated token, including the padding a finished row receives (give
    ``skip_special_tokens=True`` to drop it when pad is a special token). Iteration ends after ``end()``;
    ``timeout`` (seconds) bounds each wait, as in HF's ``TextIteratorStreamer``.
    """

    _END = object()

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs: Any):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.timeout = timeout
        self.decode_kwargs = decode_kwargs
        self.queue: Queue = Queue()
        self.rows: list[list[int]] = []
        self.detokenizers: list[IncrementalDetokenizer] = []

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1:  # the prompt, put once before the first step
            self.rows = [[] if self.skip_prompt else row for row in value.tolist()]
            self.detokenizers = [IncrementalDetokenizer(self.tokenizer, **self.decode_kwargs) for _ in self.rows]
        else:
            for row, token in enumerate(value.tolist()):
                self.rows[row].append(token)
        for row, tokens in enumerate(self.rows):
            text = self.detokenizers[row].step(tokens)
            if text:
                self.queue.put((row, text))

    def end(self) -> None:
        for row, tokens in enumerate(self.rows):
            text = self.detokenizers[row].flush(tokens)
            if text:
                self.queue.put((row, text))
        self.queue.put(self._END)

    def __iter__(self) -> BatchTextIteratorStreamer:
        return self

    def __next__(self) -> tuple[int, str]:
        item = self.queue.get(timeout=self.timeout)
        if item is self._END:
            raise StopIteration
        return item
