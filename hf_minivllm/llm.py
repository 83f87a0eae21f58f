"""LLM: the offline API (nano-vllm / vLLM style). Prompts in, ``{"text", "token_ids"}`` dicts out, in order."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence as SequenceOf
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from hf_minivllm.config import Config
from hf_minivllm.engine.llm_engine import EngineClosed, LLMEngine
from hf_minivllm.engine.loop import EngineLoop, RequestGroup
from hf_minivllm.engine.sequence import FinishReason, Sequence, answer_token_ids
from hf_minivllm.models.adapter import (
    build_decoder,
    check_tensor_parallel,
    load_hf_model,
    model_devices,
    spread_size,
    unwrap_model,
)
from hf_minivllm.models.decoder import DecoderForCausalLM
from hf_minivllm.models.loading import eos_token_ids_of, load_tokenizer
from hf_minivllm.models.weight_sync import WeightChange, WeightSnapshot, WeightWatcher
from hf_minivllm.sampling_params import SamplingParams
from hf_minivllm.tp import TensorParallelWorkers, tensor_parallel_devices

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

    Any number of threads may call ``generate`` and ``stream`` at once: their requests join one continuous batch
    (one engine, driven by whichever caller is waiting; see ``hf_minivllm.engine.loop``), and each call gets its
    own results. Every call first checks, cheaply, whether the model's
    weights changed since the last one (see ``hf_minivllm.models.weight_sync``): new values reset the prefix cache,
    new tensors (dtype, device, replaced parameters) rebuild the decoder.
    """

    def __init__(self, model: Any, tokenizer: Any = None, **config: Any):
        unknown = set(config) - set(Config.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown LLM config argument(s) {sorted(unknown)}; valid: {sorted(Config.__dataclass_fields__)}")
        if config.get("kv_cache_resident") is None:
            config["kv_cache_resident"] = True  # the offline API pre-allocates, as vLLM does
        if not isinstance(model, str) and "tensor_parallel_size" not in config:
            config["tensor_parallel_size"] = spread_size(unwrap_model(model))  # device_map="auto": shard it there
        self.config = Config(model=model, **config)
        tp_size = self.config.tensor_parallel_size
        if isinstance(model, str):
            # Sharded, the model is read into CPU memory and each rank's shards go to its device from there.
            hf_model = load_hf_model(model, device="cpu" if tp_size > 1 else None)
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
        else:
            hf_model = unwrap_model(model)
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.config.fit_to_model(getattr(hf_model.config, "max_position_embeddings", None))
        self._workers: TensorParallelWorkers | None = None
        if tp_size > 1 or spread_size(hf_model) > 1:
            check_tensor_parallel(hf_model, tp_size)
            devices = model_devices(hf_model)
            first = devices[0]
            if isinstance(model, str) and torch.cuda.is_available():
                first = torch.device("cuda", torch.cuda.current_device())
            self._workers = TensorParallelWorkers(tensor_parallel_devices(first, tp_size, devices))
        try:
            before_build = WeightSnapshot(hf_model)
            self.model = self._build_decoder()
            self._weights = WeightWatcher(hf_model, self.model.weight_sources, self.model.adapter_state,
                                          since=before_build)
            self._weights_lock = threading.Lock()
            self.engine = LLMEngine(self.model, self.config, eos_token_ids_of(hf_model, tokenizer), self._workers)
        except BaseException:
            if self._workers is not None:
                self._workers.close()
            raise
        self.loop = EngineLoop(self.engine)

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

    def _answer(self, seq: Sequence, completion: list[int], finish_reason: FinishReason | None) -> list[int]:
        return answer_token_ids(completion, finish_reason, seq.sampling_params, self.engine.eos_token_ids)

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
        return [{"text": self._decode(self._answer(seq, seq.completion_token_ids, seq.finish_reason)),
                 "token_ids": seq.completion_token_ids} for seq in seqs]

    def stream(
        self,
        prompts: Prompt | SequenceOf[Prompt],
        sampling_params: SamplingParams | SequenceOf[SamplingParams] | None = None,
    ) -> Iterator[StreamOutput]:
        """Generate like ``generate``, yielding a ``StreamOutput`` per request each time it gets tokens.

        All prompts run as one continuous batch (with whatever other calls run meanwhile); events come in step
        order, and within a step in batch order. The engine runs while the loop asks for the next event (or while
        other callers wait on it); when other callers kept it running meanwhile, one event carries the tokens of
        several steps. A request's last event carries its ``finish_reason``. Leaving the loop early aborts the
        unfinished requests.
        """
        token_ids, sampling_params = self._requests(prompts, sampling_params)
        seqs = self.sequences(token_ids, sampling_params)
        index_of = {seq.seq_id: index for index, seq in enumerate(seqs)}
        detokenizers = [IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True) for _ in seqs]
        emitted, finished = [0] * len(seqs), [False] * len(seqs)
        group = self.loop.submit(seqs, watch_steps=True)
        for update in self.loop.updates(group):
            for seq, count, finish_reason in update:
                index = index_of[seq.seq_id]
                completion = seq.token_ids[seq.num_prompt_tokens : seq.num_prompt_tokens + count]
                if finished[index] or (len(completion) == emitted[index] and finish_reason is None):
                    continue
                finished[index] = finish_reason is not None
                answer = self._answer(seq, completion, finish_reason)
                text = detokenizers[index].step(answer)
                if finish_reason is not None:
                    text += detokenizers[index].flush(answer)
                yield StreamOutput(index, text, completion[emitted[index] :], _reason(finish_reason))
                emitted[index] = len(completion)

    def sequences(self, token_ids: list[list[int]], sampling_params: list[SamplingParams]) -> list[Sequence]:
        """Validated, not yet queued engine sequences for tokenized prompts, after syncing with the model's weights."""
        self.sync_weights()
        return self.engine.new_sequences(token_ids, sampling_params)

    def generate_sequences(
        self, token_ids: list[list[int]], sampling_params: list[SamplingParams], use_tqdm: bool = False
    ) -> list[Sequence]:
        """The engine's finished sequences for already-tokenized prompts, in order."""
        seqs = self.sequences(token_ids, sampling_params)
        progress = _Progress(len(seqs), self.engine.stats) if use_tqdm else None
        try:
            return self.loop.wait(self.loop.submit(seqs), poll=progress.update if progress else None,
                                  **({"poll_interval_s": 0.1} if progress else {}))
        finally:
            if progress is not None:
                progress.close()

    def sync_would_block(self) -> bool:
        """Whether the next call's weight sync (``sequences``) may block: a rebuild (new weight tensors), the ranks'
        shard refresh (tensor parallel), or another thread's sync under way. Otherwise it returns at once."""
        if not self._weights_lock.acquire(blocking=False):
            return True
        try:
            change = self._weights.check()
            return change is WeightChange.TENSORS or (change is WeightChange.VALUES and self._workers is not None)
        finally:
            self._weights_lock.release()

    def sync_weights(self) -> None:
        """Bring the engine in line with the model's weights: called by every generate/stream call. What the check
        saw is committed only once the reset or rebuild is under way, so a failure is retried by the next call."""
        self.loop.ensure_not_driving()
        with self._weights_lock:
            change = self._weights.check()
            if change is WeightChange.VALUES:
                if self._workers is not None:  # the ranks hold copies of their shards: overwrite them
                    self.loop.call(self._refresh_shards)
                self.loop.post(LLMEngine.reset_prefix_cache)
                self._weights.commit()
                self.engine.stats.weight_updates += 1
            elif change is WeightChange.TENSORS:
                self.loop.call(self._rebuild)
                self.engine.stats.weight_updates += 1

    def _build_decoder(self) -> DecoderForCausalLM:
        """The decoder for the model as it is now; sharded, rank 0's shards here and every worker's sent to it."""
        if self._workers is None:
            return build_decoder(self.hf_model)
        workers = self._workers
        model = build_decoder(self.hf_model, 0, workers.size, group=workers.group, device=workers.devices[0])
        workers.load(self._shard_views)
        return model

    def _shard_views(self, rank: int) -> DecoderForCausalLM:
        """Rank ``rank``'s shards as views of the HF weights where they lie (fused parts built), for sending."""
        return build_decoder(self.hf_model, rank, self._workers.size)

    def _refresh_shards(self, engine: LLMEngine) -> None:
        """Runs on the engine loop: every rank overwrites its shards with the HF model's new values."""
        self._workers.refresh(self.model, self._shard_views)

    def _rebuild(self, engine: LLMEngine) -> None:
        """Runs on the engine loop: a new decoder from the model as it is now, served by a new runner."""
        if engine.closed:  # an earlier rebuild failed for good: building again would only waste the time
            raise EngineClosed("this engine is closed (it could not rebuild its decoder); make a new one")
        before_build = WeightSnapshot(self.hf_model)
        model = self._build_decoder()
        watcher = WeightWatcher(self.hf_model, model.weight_sources, model.adapter_state, since=before_build)
        engine.reload_model(model)
        self.model, self._weights = model, watcher
        engine.stats.rebuilds += 1

    def reset_prefix_cache(self) -> None:
        """Make sure no KV computed so far is reused (weights changed in a way the engine cannot see, such as
        ``param.data.add_(...)``). Requests queued after this call are served without reusing earlier KV. A sharded
        model's ranks hold copies of their weights: they are refreshed from the model first."""
        if self._workers is not None:
            self.loop.call(self._refresh_shards)
        self.loop.post(LLMEngine.reset_prefix_cache)

    def close(self) -> None:
        """Abort running requests and release the KV cache and CUDA graphs (and stop the tensor-parallel workers);
        later calls raise ``EngineClosed``."""
        self.loop.ensure_not_driving()  # from inside a step nothing is closed (the workers are mid-step too)
        try:
            self.loop.close()
        finally:
            if self._workers is not None:
                self._workers.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _reason(finish_reason: FinishReason | None) -> str | None:
    return finish_reason.value if finish_reason is not None else None


class _Progress:
    """tqdm bar over finished requests, with the engine's prompt and generated tokens per second."""

    def __init__(self, total: int, stats: Any):
        self.bar = tqdm(total=total, desc="Generating", dynamic_ncols=True)
        self.stats = stats
        self.last = (time.perf_counter(), stats.prompt_tokens, stats.generated_tokens)

    def update(self, group: RequestGroup) -> None:
        now = (time.perf_counter(), self.stats.prompt_tokens, self.stats.generated_tokens)
        elapsed = max(now[0] - self.last[0], 1e-9)
        self.bar.set_postfix(prompt=f"{(now[1] - self.last[1]) / elapsed:.0f} tok/s",
                             generated=f"{(now[2] - self.last[2]) / elapsed:.0f} tok/s", refresh=False)
        self.last = now
        self.bar.update(group.num_finished - self.bar.n)

    def close(self) -> None:
        self.bar.close()
