"""``model.generate`` served by the engine, with HF's output contract; anything it cannot serve goes to HF.

Settings are resolved by HF's own helpers in HF's order (explicit kwargs > ``generation_config=`` >
``model.generation_config`` > library defaults; length and special-token preparation), and HF builds its own logits
processors and stopping criteria from them. When those are all things the engine does itself (temperature, top-k/p,
min-p, min length, eos, max length) the call runs purely in the engine; otherwise HF's lists run on the engine's
batch every step through an ``HFStepHook``. Rows of the left-padded batch become independent engine requests
(padding stripped, positions from 0, as HF derives them from the attention mask); the results are put back into
HF's ``[batch * num_return_sequences, prompt_len + longest]`` tensor (or ``GenerateDecoderOnlyOutput``), rows that
finished early padded with ``pad_token_id``.
"""
from __future__ import annotations

import functools
import inspect
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_minivllm.engine.sequence import Sequence
from hf_minivllm.models.adapter import UnsupportedModel
from hf_minivllm.patches.generation_fields import FALLBACK_ARGUMENTS, FALLBACK_MODEL_KWARGS, fallback_reason
from hf_minivllm.patches.hf_compat import prepare_special_tokens, resolve_generation_config
from hf_minivllm.patches.state import redirect_of, state_of
from hf_minivllm.patches.step_hook import HFStepHook
from hf_minivllm.sampling_params import SamplingParams

# The smallest top_p the engine takes (it refuses 0, as vLLM does): HF's top_p=0 keeps the most likely token alone.
_SMALLEST_TOP_P = torch.finfo(torch.float32).tiny


class _Fallback(Exception):
    """Raised inside preparation when the call must go to HF's own generate; carries the reason."""


@dataclass
class GenerateCall:
    """One ``model.generate(*args, **kwargs)`` call: as given (to replay it on HF) and bound to HF's signature."""

    args: tuple
    kwargs: dict[str, Any]
    named: dict[str, Any]  # HF's named parameters: inputs, generation_config, logits_processor, streamer, ...
    extra: dict[str, Any]  # HF's **kwargs: generation settings and model inputs

    @classmethod
    def bind(cls, model: Any, args: tuple, kwargs: dict[str, Any]) -> GenerateCall:
        signature = inspect.signature(type(model).generate)
        bound = signature.bind(model, *args, **kwargs)
        var_keyword = next(p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD)
        named = {name: value for name, value in bound.arguments.items() if name not in ("self", var_keyword)}
        return cls(args, kwargs, named, dict(bound.arguments.get(var_keyword, {})))


@dataclass
class EngineCall:
    """One generate call resolved for the engine, and what it takes to give back HF's result."""

    input_ids: torch.Tensor  # HF's input_ids: the left-padded prompts, expanded by num_return_sequences
    prompts: list[list[int]]  # each row's real tokens
    params: SamplingParams
    pad_token_id: int | None
    return_dict: bool
    streamer: Any = None
    hook: HFStepHook | None = None
    seqs: list[Sequence] = field(default_factory=list)
    streamed_steps: int = 0

    def attach(self, seqs: list[Sequence]) -> None:
        self.seqs = seqs
        if self.hook is not None:
            self.hook.bind(seqs)

    def _length(self, row: int, seq: Sequence) -> int:
        generated = seq.num_completion_tokens
        return self.hook.generated_length(row, generated) if self.hook is not None else generated

    def num_steps(self) -> int | None:
        """How many steps HF's loop runs for this call, once that is known (every row done), else None."""
        all_done = self.hook is not None and all(self.hook.done)
        if not all_done and not all(seq.is_finished for seq in self.seqs):
            return None
        return max(self._length(row, seq) for row, seq in enumerate(self.seqs))

    def stream(self, state_lock: Any) -> None:
        """Hand the streamer every step whose token is known for every row (HF puts one ``[batch]`` tensor a step).

        The rows are read under ``state_lock`` (the engine loop may be stepping them); the streamer, user code, is
        called outside it, so a slow streamer holds up this call only.
        """
        steps = []
        with state_lock:
            limit = self.num_steps()
            while limit is None or self.streamed_steps + len(steps) < limit:
                step = self.streamed_steps + len(steps)
                if not all(seq.num_completion_tokens > step or seq.is_finished for seq in self.seqs):
                    break
                steps.append([self._token(seq, step) for seq in self.seqs])
        for tokens in steps:  # HF's new tokens are int64 whatever the prompt's dtype
            self.streamer.put(torch.tensor(tokens, dtype=torch.long, device="cpu"))
            self.streamed_steps += 1

    def _token(self, seq: Sequence, step: int) -> int:
        if seq.num_completion_tokens > step:
            return seq.token_ids[seq.num_prompt_tokens + step]
        return self.pad_token_id if self.pad_token_id is not None else 0

    def output(self) -> Any:
        num_steps = self.num_steps()
        filler = self.pad_token_id if self.pad_token_id is not None else 0
        generated = torch.full((len(self.seqs), num_steps), filler, dtype=torch.long, device="cpu")
        for row, seq in enumerate(self.seqs):
            tokens = seq.completion_token_ids[: self._length(row, seq)]
            generated[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long, device="cpu")
        # HF's torch.cat of the prompt and its int64 tokens promotes an int32 prompt: the result is int64 either way
        sequences = torch.cat([self.input_ids, generated.to(self.input_ids.device)], dim=1)
        if not self.return_dict:
            return sequences
        from transformers.generation import GenerateDecoderOnlyOutput

        scores, logits = self.hook.recorded(num_steps) if self.hook is not None else (None, None)
        return GenerateDecoderOnlyOutput(
            sequences=sequences,
            scores=_outside_inference_mode(scores),
            logits=_outside_inference_mode(logits),
            attentions=None,
            hidden_states=None,
            past_key_values=None,
        )


def _outside_inference_mode(tensors: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...] | None:
    """Recorded inside the engine's inference mode; cloned so the user gets ordinary tensors, as from HF."""
    return tuple(t.clone() if t.is_inference() else t for t in tensors) if tensors is not None else None


def _argument_fallback(named: dict[str, Any], extra: dict[str, Any]) -> str | None:
    for name in FALLBACK_ARGUMENTS:
        if named.get(name) is not None:
            return f"{name}= (see docs/generation_config.md)"
    if extra.get("assistant_tokenizer") is not None:
        return "assistant_tokenizer= (assisted decoding)"
    return None


def _model_kwargs_fallback(model_kwargs: dict[str, Any]) -> str | None:
    for name in FALLBACK_MODEL_KWARGS:
        if model_kwargs.get(name) is not None:
            return f"{name}= (the engine takes token ids and builds its own cache and positions)"
    return None


def _left_padded_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """Each row's real tokens; raises _Fallback unless every row is left-padded (zeros, then ones)."""
    mask = attention_mask.to(torch.bool)
    lengths = mask.sum(dim=1)
    width = input_ids.shape[1]
    positions = torch.arange(width, device=mask.device)
    expected = positions[None, :] >= (width - lengths)[:, None]
    if not torch.equal(mask, expected):
        raise _Fallback("attention_mask is not left padding (right padding or holes)")
    if int(lengths.min()) == 0:
        raise _Fallback("a row of the batch has no tokens")
    ids = input_ids.tolist()
    return [row[width - n :] for row, n in zip(ids, lengths.tolist())]


def _as_id_list(tensor: torch.Tensor | None) -> list[int]:
    if tensor is None:
        return []
    return [int(t) for t in tensor.reshape(-1).tolist()]


@functools.cache
def _engine_served_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """HF processors and criteria whose effect the engine reproduces itself (sampler filters, min/max length, eos)."""
    from transformers.generation import (
        EosTokenCriteria,
        MaxLengthCriteria,
        MinLengthLogitsProcessor,
        MinNewTokensLengthLogitsProcessor,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
        MinPLogitsWarper,
        MinLengthLogitsProcessor,
        MinNewTokensLengthLogitsProcessor,
    )
    return processors, (MaxLengthCriteria, EosTokenCriteria)


def _prepare(model: Any, llm: Any, call: GenerateCall) -> EngineCall:
    """Resolve the call the way HF's generate does; returns the engine's share of it, or raises _Fallback."""
    from transformers.generation import LogitsProcessorList, StoppingCriteriaList

    named, kwargs = call.named, dict(call.extra)
    reason = _argument_fallback(named, kwargs)
    if reason:
        raise _Fallback(reason)
    mode_kwargs = model._extract_generation_mode_kwargs(
        named.get("custom_generate"), kwargs, named.get("synced_gpus"), None, named.get("streamer")
    )
    kwargs.pop("trust_remote_code", None)
    generation_config, model_kwargs, has_default_max_length, has_default_min_length = resolve_generation_config(
        model, named.get("generation_config"), kwargs, named.get("use_model_defaults")
    )
    model._validate_model_kwargs(model_kwargs.copy())
    reason = _model_kwargs_fallback(model_kwargs) or fallback_reason(generation_config)
    if reason:
        raise _Fallback(reason)
    mode = generation_config.get_generation_mode(None)
    if mode.value not in ("greedy_search", "sample"):
        raise _Fallback(f"generation mode {mode.value}")
    model._validate_generation_mode(mode, generation_config, mode_kwargs)

    input_ids = named.get("inputs")
    if input_ids is None:
        input_ids = model_kwargs.pop("input_ids", None)
    elif model_kwargs.get("input_ids") is not None:
        raise _Fallback("both inputs and input_ids= given (HF refuses the call)")
    if input_ids is None or not torch.is_tensor(input_ids) or input_ids.dim() != 2:
        raise _Fallback("no 2-D input_ids given")
    attention_mask = model_kwargs.get("attention_mask")
    prepare_special_tokens(model, generation_config, attention_mask is not None, input_ids.device, input_ids.shape[0])
    if attention_mask is None:
        attention_mask = model._prepare_attention_mask_for_generation(input_ids, generation_config, model_kwargs)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
    width = input_ids.shape[1]
    generation_config = model._prepare_generated_length(
        generation_config=generation_config,
        has_default_max_length=has_default_max_length,
        has_default_min_length=has_default_min_length,
        model_input_name="input_ids",
        input_ids_length=width,
        inputs_tensor=input_ids,
    )
    model._validate_generated_length(generation_config, width, has_default_max_length)

    rows = _left_padded_rows(input_ids, attention_mask)
    max_new = generation_config.max_length - width
    if max_new <= 0:
        raise _Fallback(f"max_length={generation_config.max_length} leaves no room after the {width}-token prompt")
    longest = max(len(row) for row in rows) + max_new
    if longest > llm.engine.max_sequence_tokens:
        raise _Fallback(
            f"prompt + {max_new} new tokens = {longest} tokens exceeds the engine's limit of "
            f"{llm.engine.max_sequence_tokens}"
        )
    user_processors = named.get("logits_processor") or LogitsProcessorList()
    user_criteria = named.get("stopping_criteria") or StoppingCriteriaList()
    processors = model._get_logits_processor(
        generation_config=generation_config,
        input_ids_seq_length=width,
        encoder_input_ids=input_ids,
        prefix_allowed_tokens_fn=named.get("prefix_allowed_tokens_fn"),
        logits_processor=user_processors,
        device=input_ids.device,
        model_kwargs=model_kwargs,
    )
    criteria = model._get_stopping_criteria(
        generation_config=generation_config, stopping_criteria=user_criteria, tokenizer=mode_kwargs.get("tokenizer")
    )

    copies = generation_config.num_return_sequences or 1
    expanded = input_ids.repeat_interleave(copies, dim=0)
    # HF warns about an eos id outside the vocabulary (-1 is a common "never stop") and generates on: no token matches
    vocab = llm.engine.model.vocab_size
    eos_ids = [token for token in _as_id_list(generation_config._eos_token_tensor) if 0 <= token < vocab]
    pad = generation_config._pad_token_tensor
    pad_id = int(pad.reshape(-1)[0]) if pad is not None else None
    return_dict = bool(generation_config.return_dict_in_generate)
    record_scores = return_dict and bool(generation_config.output_scores)
    record_logits = return_dict and bool(generation_config.output_logits)
    engine_processors, engine_criteria = _engine_served_types()
    needs_hook = (
        record_scores
        or record_logits
        or len(user_processors) > 0
        or len(user_criteria) > 0
        or any(type(processor) not in engine_processors for processor in processors)
        or any(type(criterion) not in engine_criteria for criterion in criteria)
    )
    if needs_hook:
        has_eos_criterion = any(hasattr(criterion, "eos_token_id") for criterion in criteria)
        hook = HFStepHook(
            expanded,
            processors,
            criteria,
            pad_id,
            max_new,
            keep_finished_rows=record_scores or record_logits or not has_eos_criterion,
            pad_finished_rows=has_eos_criterion,
            record_scores=record_scores,
            record_logits=record_logits,
        )
        params = SamplingParams(
            max_tokens=max_new, ignore_eos=True, temperature=1.0 if generation_config.do_sample else 0.0, step_hook=hook
        )
    else:
        hook = None
        params = _engine_sampling_params(generation_config, width, max_new, eos_ids)
    return EngineCall(
        input_ids=expanded,
        prompts=[row for row in rows for _ in range(copies)],
        params=params,
        pad_token_id=pad_id,
        return_dict=return_dict,
        streamer=named.get("streamer"),
        hook=hook,
    )


def _engine_sampling_params(generation_config: Any, width: int, max_new: int, eos_ids: list[int]) -> SamplingParams:
    """The engine's own settings for a call whose processors and criteria it reproduces itself."""
    if generation_config.do_sample:
        sampling = dict(
            temperature=float(generation_config.temperature if generation_config.temperature is not None else 1.0),
            top_k=int(generation_config.top_k or 0),
            top_p=max(float(generation_config.top_p if generation_config.top_p is not None else 1.0), _SMALLEST_TOP_P),
            min_p=float(generation_config.min_p or 0.0),
        )
    else:
        sampling = dict(temperature=0.0)
    min_new = max(0, (generation_config.min_length or 0) - width)
    return SamplingParams(
        max_tokens=max_new, min_tokens=min(min_new, max_new), ignore_eos=True, stop_token_ids=eos_ids, **sampling
    )


def _run(llm: Any, calls: list[EngineCall]) -> list[Any]:
    """Run every call's rows as one engine request group (joining whatever else the engine runs); returns each
    call's HF result, in order. Streamers are fed from this thread, as HF's own loop would feed them."""
    prompts = [prompt for call in calls for prompt in call.prompts]
    params = [call.params for call in calls for _ in call.prompts]
    seqs = llm.sequences(prompts, params)
    start = 0
    for call in calls:
        rows = seqs[start : start + len(call.prompts)]
        longest = max(seq.num_prompt_tokens for seq in rows)
        for seq in rows:  # LongRoPE: HF switches a whole batch's table by its longest row
            seq.rope_length_offset = longest - seq.num_prompt_tokens
        call.attach(rows)
        start += len(call.prompts)
    streaming = [call for call in calls if call.streamer is not None]
    for call in streaming:
        call.streamer.put(call.input_ids.cpu())
    group = llm.loop.submit(seqs, watch_steps=bool(streaming))
    if streaming:
        with closing(llm.loop.updates(group)) as updates:
            for _ in updates:
                for call in streaming:
                    call.stream(llm.loop.state_lock)
        for call in streaming:
            call.stream(llm.loop.state_lock)
            call.streamer.end()
    else:
        llm.loop.wait(group)
    return [call.output() for call in calls]


@torch.no_grad()
def generate(model: Any, *args: Any, **kwargs: Any) -> Any:
    """Drop-in for ``GenerationMixin.generate`` on an accelerated model."""
    redirect = redirect_of(model)
    if redirect is not None:
        return redirect(*args, **kwargs)
    state = state_of(model)
    call = GenerateCall.bind(model, args, kwargs)
    try:
        _sync_weights(state.llm)
        _check_no_module_hooks(model)
        prepared = _prepare(model, state.llm, call)
    except _Fallback as fallback:
        return state.fall_back(str(fallback), call.args, call.kwargs)
    return _run(state.llm, [prepared])[0]


def _sync_weights(llm: Any) -> None:
    """Bring the engine in line with the model's weights before the call is prepared; a model that became
    unservable since ``accelerate`` (a wrapped or quantized layer) is handed to HF for as long as it stays so."""
    try:
        llm.sync_weights()
    except UnsupportedModel as error:
        raise _Fallback(f"the model changed into one the engine cannot serve: {error}") from None


# transformers' own forward hooks that leave a forward's values as they are: the output recorders it installs for
# good once a forward asked for attentions or hidden states (they record only while a call collects), and the hook
# that makes the embeddings' output require grad (gradient checkpointing with adapters, TRL's trainers).
_VALUE_PRESERVING_HOOKS = frozenset({
    ("transformers.utils.output_capturing", "output_capturing_hook"),
    ("transformers.modeling_utils", "make_inputs_require_grads"),
})


def _runs_user_code(hooks: dict) -> bool:
    return any((getattr(hook, "__module__", None), getattr(hook, "__name__", None)) not in _VALUE_PRESERVING_HOOKS
               for hook in hooks.values())


def _check_no_module_hooks(model: Any) -> None:
    """HF's generate runs the model's forward hooks at every step (activation steering, probes, recorders of
    activations); the engine computes the layers itself and would skip them, a silent difference. A call on a model
    with one (but transformers' own that change nothing), or with a global module hook, is handed to HF."""
    modules = torch.nn.modules.module
    if modules._global_forward_hooks or modules._global_forward_pre_hooks:
        raise _Fallback("global module forward hooks are registered; the engine does not run module hooks")
    for module in model.modules():
        if _runs_user_code(module._forward_hooks) or _runs_user_code(module._forward_pre_hooks):
            name = next(name for name, found in model.named_modules() if found is module) or "the model"
            raise _Fallback(f"{name} has forward hooks; the engine does not run module hooks")


@torch.no_grad()
def generate_many(model: Any, calls: list[tuple[tuple, dict[str, Any]]]) -> list[Any]:
    """Several ``generate(*args, **kwargs)`` calls, each answered as if made alone, run as one engine batch.

    Calls that need HF run there first, one by one. Calls with a streamer run one after another, as HF would run
    them, so each streamer sees its own call sequence.
    """
    if any(GenerateCall.bind(model, args, kwargs).named.get("streamer") is not None for args, kwargs in calls):
        return [generate(model, *args, **kwargs) for args, kwargs in calls]
    state = state_of(model)
    results: list[Any] = [None] * len(calls)
    prepared: dict[int, EngineCall] = {}
    for index, (args, kwargs) in enumerate(calls):
        call = GenerateCall.bind(model, args, kwargs)
        try:
            _sync_weights(state.llm)
            _check_no_module_hooks(model)
            prepared[index] = _prepare(model, state.llm, call)
        except _Fallback as fallback:
            results[index] = state.fall_back(str(fallback), call.args, call.kwargs)
    for index, output in zip(prepared, _run(state.llm, list(prepared.values()))):
        results[index] = output
    return results
