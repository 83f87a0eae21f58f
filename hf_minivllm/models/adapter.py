"""Builds the compact decoder from a loaded HF ``*ForCausalLM``, sharing its weights instead of copying them.

At TP=1 the decoder uses the HF parameters themselves (embedding, norms, o_proj, down_proj, MoE routers and stacked
experts, lm_head); the fused qkv and gate_up tensors are new storage and the data of the HF q/k/v and gate/up
parameters is re-pointed to views into them, so the old separate tensors are freed and ``hf_model.forward`` keeps
working on the same numbers. The HF parameter objects themselves stay (same identity, same ``requires_grad``), so an
optimizer built before or after ``accelerate`` trains them, and its in-place updates land in the fused storage the
engine reads. At TP>1 each rank takes its own copy of its shard on its device; the shards of the other ranks are
built as views (fused parts excepted) and streamed to their workers by ``hf_minivllm.tp`` one tensor at a time, so
the full model is never gathered on one device.

``build_decoder`` records every HF tensor it read (``DecoderForCausalLM.weight_sources``), which
``hf_minivllm.models.weight_sync`` watches for changes.

This is the only module of the engine core that imports ``transformers``.
"""
from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import nn

from hf_minivllm.layers.linear import LoRA
from hf_minivllm.layers.moe import MoeConfig, SparseMoeBlock
from hf_minivllm.layers.parallel import ParallelGroup
from hf_minivllm.models.decoder import DecoderConfig, DecoderForCausalLM

SUPPORTED_ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM",
                           "Phi3ForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
# Architectures whose checkpoints hold q/k/v and gate/up already fused, in the engine's order ([q | k | v] and
# [gate | up]): Phi-3 and Phi-4 (``self_attn.qkv_proj``, ``mlp.gate_up_proj``).
FUSED_PROJECTIONS = ("Phi3ForCausalLM",)
# Architectures that mask with ``config.sliding_window`` whenever it is set.
WINDOW_WHENEVER_SET = ("MistralForCausalLM", "Phi3ForCausalLM", "Qwen3MoeForCausalLM")
# Architectures that mask with it on the layers ``config.layer_types`` marks "sliding_attention". Llama's attention
# reads neither field (HF's generate cache does: see ``_check_cache_window``).
WINDOW_BY_LAYER_TYPE = ("Gemma2ForCausalLM", "Gemma3ForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# Architectures whose generate recomputes a sequence with LongRoPE's long table once it outgrows the original context.
LONGROPE_RECOMPUTED = ("Phi3ForCausalLM",)
# The HF modules of a sparse MoE block the engine mirrors (``hf_minivllm.layers.moe``): experts, router.
MOE_MODULES = ("Qwen3MoeExperts", "Qwen3MoeTopKRouter")
# Gemma's decoder: RMSNorms scaling by (1 + weight), four norms per layer, embeddings scaled by sqrt(hidden_size).
GEMMA_ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
SCALED_EMBEDDINGS = ("Gemma2TextScaledWordEmbedding", "Gemma3TextScaledWordEmbedding")
# Architectures whose attention soft-caps its logits with ``config.attn_logit_softcapping``. Gemma 3's config has
# the field too, but its attention never passes it on (transformers 5.17): it is not applied there either.
# (HF's own sdpa attention drops Gemma 2's soft-cap, which its eager, flash and flex attention apply: the engine
# computes the model as they do.)
ATTENTION_SOFTCAP = ("Gemma2ForCausalLM",)
# HF activation names of the gated MLP -> the engine's (the sparse MoE experts compute silu only).
MLP_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
# Quantization methods whose loaded weights are plain floating-point tensors (GGUF files are dequantized on load).
DEQUANTIZED_ON_LOAD = ("gguf",)


class UnsupportedModel(ValueError):
    """The engine cannot compute what this model computes (architecture, layer kind, dtype, quantization);
    ``accelerate`` then leaves the model to transformers' own ``generate``."""


def load_hf_model(path: str, dtype: torch.dtype | str = "auto", device: torch.device | str | None = None) -> nn.Module:
    """Load a causal LM from a local folder (no network), in eval mode, on ``device`` (default: CUDA if present).

    Place the model before ``build_decoder``: moving the decoder afterwards would leave the HF modules' fused views
    behind on the old device.
    """
    from transformers import AutoModelForCausalLM

    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=str(device), local_files_only=True).eval()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside the wrappers that keep its weights as they are: ``torch.compile``'s module (a
    model compiled for training; its ``generate`` is the inner model's) and a PEFT ``PeftModel`` with a tuner (LoRA
    layers wrapping its linears); any other model as it is (prompt-learning PEFT models then stay unsupported as a
    whole). Recognised by their classes' names and modules, so neither dynamo nor peft is imported for it."""
    compiled = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(compiled, nn.Module):
        model = compiled
    base = getattr(model, "base_model", None)
    if (type(model).__module__.startswith("peft.") and type(base).__module__.startswith("peft.")
            and isinstance(getattr(base, "model", None), nn.Module)):
        return base.model
    return model


def _is_lora_layer(module: nn.Module) -> bool:
    """A PEFT LoRA layer wrapping a linear (``base_layer`` plus ``lora_A``/``lora_B`` linears per adapter); other
    tuners' layers (AdaLoRA, ...) are not, and stay unsupported wrapped layers."""
    return (type(module).__module__.startswith("peft.tuners.lora.") and hasattr(module, "base_layer")
            and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
            and isinstance(getattr(module, "lora_B", None), nn.ModuleDict))


def _base_linear(module: nn.Module) -> nn.Module:
    return module.base_layer if _is_lora_layer(module) else module


def _active_loras(module: nn.Module, path: str) -> list[str]:
    """The adapters whose update the engine must add to this LoRA layer's output, as PEFT's forward would (none when
    disabled or merged into the base weight); raises UnsupportedModel for what it does not compute."""
    if module._forward_pre_hooks:  # PEFT's per-request adapters (generate(adapter_names=...)) travel in hooks
        raise UnsupportedModel(f"{path}: per-request adapters (adapter_names) are not supported")
    if module.disable_adapters:
        if module.merged:  # PEFT's forward would unmerge the weights first
            raise UnsupportedModel(f"{path}: adapters disabled while merged into the weights")
        return []
    if module.merged:
        return []
    active = [name for name in module.active_adapters if name in module.lora_A]
    for name in active:
        if getattr(module, "use_dora", {}).get(name) or name in getattr(module, "lora_variant", {}):
            raise UnsupportedModel(f"{path}: LoRA variant (DoRA, ...) of adapter {name!r} is not supported")
        if getattr(module, "lora_bias", {}).get(name):
            raise UnsupportedModel(f"{path}: LoRA bias of adapter {name!r} is not supported")
        if getattr(module, "fan_in_fan_out", False):
            raise UnsupportedModel(f"{path}: fan_in_fan_out LoRA weights are not supported")
    return active  # LoRA dropout is not applied, like every dropout of the model (generation is inference)


def lora_state(hf_model: nn.Module) -> Hashable:
    """What decides which LoRA updates the engine adds (per LoRA layer: active adapters, disabled, merged ones,
    scalings, per-call hooks); the decoder is rebuilt when it changes."""
    return tuple(
        (tuple(module.active_adapters), bool(module.disable_adapters), tuple(module.merged_adapters),
         tuple(sorted(module.scaling.items())), tuple(module.lora_A.keys()), len(module._forward_pre_hooks))
        for module in hf_model.modules() if _is_lora_layer(module))


def _is_sparse_moe(hf_layer: nn.Module) -> bool:
    """Whether the layer's MLP is a sparse MoE block (router ``gate`` and ``experts``), as HF builds on the layers
    ``decoder_sparse_step`` and ``mlp_only_layers`` make sparse; read from the modules, not the config."""
    return hasattr(hf_layer.mlp, "experts") and hasattr(hf_layer.mlp, "gate")


def _projection_paths(hf_model: nn.Module, hf_layer: nn.Module) -> dict[str, tuple[str, ...]]:
    """The HF linears making up each engine projection, as paths inside a decoder layer (no MLP linears in a
    sparse MoE layer)."""
    if type(hf_model).__name__ in FUSED_PROJECTIONS:
        qkv, gate_up = ("self_attn.qkv_proj",), ("mlp.gate_up_proj",)
    else:
        qkv, gate_up = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")
    paths = {"qkv": qkv, "o": ("self_attn.o_proj",)}
    if not _is_sparse_moe(hf_layer):
        paths.update(gate_up=gate_up, down=("mlp.down_proj",))
    return paths


def _projections(hf_model: nn.Module, hf_layer: nn.Module) -> dict[str, list[nn.Linear]]:
    """The HF linears of each engine projection (a LoRA layer's base linear in its place)."""
    return {name: [_base_linear(hf_layer.get_submodule(path)) for path in paths]
            for name, paths in _projection_paths(hf_model, hf_layer).items()}


def _check_moe_block(config: object, hf_mlp: nn.Module, path: str) -> None:
    """A sparse MoE block the engine computes: HF's own experts and router modules, unwrapped, with the config's
    shapes (stacked ``[gate | up]`` experts, no biases)."""
    if isinstance(hf_mlp.experts, nn.ModuleList):
        raise UnsupportedModel(f"{path}.experts: one module per expert (transformers 4.x) is not supported; the "
                               "engine serves the stacked experts of transformers 5")
    for name in ("experts", "gate"):
        module = getattr(hf_mlp, name)
        if type(module).__module__.startswith("peft.") or _is_lora_layer(module):
            raise UnsupportedModel(f"{path}.{name}: PEFT adapters on MoE experts or routers are not supported (LoRA "
                                   "on the attention and dense MLP projections is)")
        if type(module).__name__ not in MOE_MODULES:
            raise UnsupportedModel(f"{path}.{name} is a {type(module).__name__}, not one of "
                                   f"{', '.join(MOE_MODULES)}: the engine cannot serve wrapped or quantized layers")
    experts, router = hf_mlp.experts, hf_mlp.gate
    experts_count, hidden, width = config.num_experts, config.hidden_size, config.moe_intermediate_size
    layout_matches = (tuple(experts.gate_up_proj.shape) == (experts_count, 2 * width, hidden)
                      and tuple(experts.down_proj.shape) == (experts_count, hidden, width)
                      and tuple(router.weight.shape) == (experts_count, hidden)
                      and router.top_k == config.num_experts_per_tok)
    if not layout_matches or getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False):
        raise UnsupportedModel(f"{path}: MoE expert weights in a layout the engine does not serve")


def _is_scaled_embedding(module: nn.Module) -> bool:
    """Gemma's embedding: an ``nn.Embedding`` whose output HF multiplies by its ``embed_scale``."""
    return type(module).__name__ in SCALED_EMBEDDINGS and type(module).__module__.startswith("transformers.")


def _check_plain_layers(hf_model: nn.Module) -> None:
    """Every projection is a plain ``nn.Linear`` (and the embedding a plain ``nn.Embedding``, or Gemma's scaled
    one): a wrapped or quantized layer (an adapter, bitsandbytes, ...) computes something the engine would not."""
    inner = hf_model.model
    expected = [(inner.embed_tokens, nn.Embedding, "model.embed_tokens"), (hf_model.lm_head, nn.Linear, "lm_head")]
    for index, layer in enumerate(inner.layers):
        if _is_sparse_moe(layer):
            _check_moe_block(hf_model.config, layer.mlp, f"model.layers.{index}.mlp")
        for path in (path for group in _projection_paths(hf_model, layer).values() for path in group):
            module, full_path = layer.get_submodule(path), f"model.layers.{index}.{path}"
            if _is_lora_layer(module):
                _active_loras(module, full_path)
            expected.append((_base_linear(module), nn.Linear, full_path))
    for module, kind, path in expected:
        if type(module) is not kind and not (kind is nn.Embedding and _is_scaled_embedding(module)):
            raise UnsupportedModel(f"{path} is a {type(module).__name__}, not a plain {kind.__name__}: the engine "
                                   "cannot serve wrapped or quantized layers")
        if "weight" not in module._parameters or module._forward_pre_hooks:
            # torch.nn.utils.prune: the weight is recomputed from weight_orig and a mask before each forward
            raise UnsupportedModel(f"{path}'s weight is computed by a forward pre-hook (pruning?), not a parameter: "
                                   "the engine would not run the hook")


def _quantization_method(config: object) -> str | None:
    """The model's quantization method ("bitsandbytes", "gptq", "gguf", ...), None when it has none."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    if isinstance(quantization, dict):
        method = quantization.get("quant_method")
    else:
        method = getattr(quantization, "quant_method", None)
    return str(getattr(method, "value", method) or "unknown")


def _bind_loras(bind: "_Binder", hf_model: nn.Module, hf_layer: nn.Module, layer: nn.Module) -> None:
    """The active PEFT adapters of each projection, as updates on the engine layer computing it: rows of the fused
    output for q/k/v and gate/up parts, the whole output for o_proj and down_proj."""
    targets = {"qkv": layer.self_attn.qkv_proj, "o": layer.self_attn.o_proj}
    if not isinstance(layer.mlp, SparseMoeBlock):
        targets.update(gate_up=layer.mlp.gate_up_proj, down=layer.mlp.down_proj)
    for name, paths in _projection_paths(hf_model, hf_layer).items():
        target = targets[name]
        rows = target.part_slices() if len(paths) > 1 else [None]
        for path, part_rows in zip(paths, rows):
            module = hf_layer.get_submodule(path)
            if not _is_lora_layer(module):
                continue
            if bind.tp_size != 1:
                raise UnsupportedModel("PEFT adapters are served at tensor_parallel_size=1 only")
            for adapter in _active_loras(module, path):
                lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
                bind.sources += [(lora_a, "weight"), (lora_b, "weight")]
                target.loras.append(LoRA(lora_a.weight, lora_b.weight, module.scaling[adapter], part_rows))


def _mlp_activation(hf_model: nn.Module) -> str:
    """The engine's name for the MLP's activation, read from the config field the family's modeling reads (Gemma's
    ``hidden_activation``, the others' ``hidden_act``: a config may carry both)."""
    field = "hidden_activation" if type(hf_model).__name__ in GEMMA_ARCHITECTURES else "hidden_act"
    name = getattr(hf_model.config, field, None)
    if name not in MLP_ACTIVATIONS:
        raise UnsupportedModel(f"unsupported MLP activation {name!r}; supported: {', '.join(MLP_ACTIVATIONS)}")
    activation = MLP_ACTIVATIONS[name]
    if activation != "silu" and any(_is_sparse_moe(layer) for layer in hf_model.model.layers):
        raise UnsupportedModel(f"MoE experts with activation {name!r} are not supported: the engine's fused experts "
                               "compute silu")
    return activation


def _rope_tables(hf_model: nn.Module) -> dict[str, tuple[nn.Module, str, str, float]]:
    """The HF model's rotary tables, as ``(module, inv_freq attribute, rope type, attention scaling)`` by the layer
    type using each. Gemma 3 keeps one per type ("full_attention", "sliding_attention"): in one module on
    transformers 5, in ``rotary_emb`` and ``rotary_emb_local`` on 4.x; the others one table ("all")."""
    inner = hf_model.model
    rotary = inner.rotary_emb
    if isinstance(rotary.rope_type, dict):
        return {layer_type: (rotary, f"{layer_type}_inv_freq", rope_type,
                             getattr(rotary, f"{layer_type}_attention_scaling"))
                for layer_type, rope_type in rotary.rope_type.items()}
    tables = {"all": (rotary, "inv_freq", rotary.rope_type, rotary.attention_scaling)}
    local = getattr(inner, "rotary_emb_local", None)
    if local is not None:
        tables = {"full_attention": tables["all"],
                  "sliding_attention": (local, "inv_freq", local.rope_type, local.attention_scaling)}
    return tables


def _layer_types(hf_model: nn.Module) -> tuple[str, ...]:
    """Per layer, HF's "full_attention" or "sliding_attention", which picks its mask (and Gemma 3's rotary
    table); empty when every layer is full. Layer ``i`` of the model is HF's ``config.layer_types[i]``, also when
    layers were removed from the end of a loaded model."""
    config = hf_model.config
    if getattr(config, "sliding_window", None) is None:
        return ()
    name, count = type(hf_model).__name__, len(hf_model.model.layers)
    if name in WINDOW_WHENEVER_SET:
        return ("sliding_attention",) * count
    if name in WINDOW_BY_LAYER_TYPE:
        return tuple((getattr(config, "layer_types", None) or ())[:count])
    return ()


def _check_cache_window(hf_model: nn.Module) -> None:
    """Refuse a window that HF's generate cache applies where the model's attention masks none.

    Transformers builds generate's cache from the config whatever the architecture: layers that ``layer_types`` (or,
    without it, ``sliding_window`` then ``attention_chunk_size``) make windowed keep only their last keys. Left in a
    config whose attention ignores them (a window in a Llama config, a chunk size in Mistral's), they make HF's
    generate differ from its own forward, and from anything the engine computes.
    """
    config = hf_model.config
    layers, sliding = config.num_hidden_layers, getattr(config, "sliding_window", None)
    chunk = getattr(config, "attention_chunk_size", None)
    cache_types = getattr(config, "layer_types", None) or (
        ["sliding_attention" if sliding is not None else "chunked_attention" if chunk is not None
         else "full_attention"] * layers)
    cache_window = chunk if "chunked_attention" in cache_types else sliding
    masked = _layer_types(hf_model) or ("full_attention",) * len(hf_model.model.layers)
    for index, (cache_type, mask_type) in enumerate(zip(cache_types, masked)):
        kept = cache_window if cache_type in ("sliding_attention", "chunked_attention") else None
        if kept is None or kept >= config.max_position_embeddings:
            continue
        if mask_type != "sliding_attention" or kept != sliding:
            raise UnsupportedModel(f"layer {index} of this {type(hf_model).__name__}: the config's window settings "
                                   f"make HF's generate cache keep only the last {kept} tokens, which its attention "
                                   "does not mask; not supported")


def _check_supported(hf_model: nn.Module) -> None:
    name = type(hf_model).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModel(f"unsupported architecture {name}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    module = type(hf_model).__module__
    if not module.startswith("transformers."):
        # Remote code (trust_remote_code=True: Phi-3's own modeling_phi3, ...) names its classes as transformers does.
        raise UnsupportedModel(f"{name} from {module} is not transformers' own class, whose modeling the engine "
                               "mirrors")
    config = hf_model.config
    method = _quantization_method(config)
    if method is not None and method.lower() not in DEQUANTIZED_ON_LOAD:
        raise UnsupportedModel(f"quantized weights ({method}) are not supported; the engine serves 16-bit and "
                               "wider floating-point weights")
    _check_plain_layers(hf_model)
    dtype = hf_model.model.embed_tokens.weight.dtype
    if not dtype.is_floating_point or dtype.itemsize < 2:  # int8 / float8 storage needs scales the engine lacks
        raise UnsupportedModel(f"weights of dtype {dtype} are not supported (16-bit and wider floats are)")
    _mlp_activation(hf_model)
    head_dim = hf_model.model.layers[0].self_attn.head_dim
    for rotary, inv_freq_name, rope_type, _ in _rope_tables(hf_model).values():
        if "dynamic" in rope_type:
            raise UnsupportedModel(f"rope type {rope_type!r} recomputes its frequencies for every sequence length; "
                                   "unsupported (default, linear, llama3, yarn and Phi-3's longrope are supported)")
        if rope_type == "longrope" and name not in LONGROPE_RECOMPUTED:
            # HF's generate keeps the keys it rotated with the short table after the switch for these
            # architectures: a cache the engine does not reproduce (Phi-3 recomputes the sequence, as the engine does).
            raise UnsupportedModel(f"longrope on {name} (served for {', '.join(LONGROPE_RECOMPUTED)})")
        rotated = getattr(rotary, inv_freq_name).numel() * 2
        if rotated != head_dim:
            raise UnsupportedModel(f"partial rotary embedding ({rotated} of {head_dim} head dimensions rotated) is "
                                   "not supported")
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModel("bidirectional attention (use_bidirectional_attention) is not supported; the engine "
                               "generates causally")
    _check_cache_window(hf_model)
    unknown = set(_layer_types(hf_model)) - {"full_attention", "sliding_attention"}
    if unknown:
        raise UnsupportedModel(f"unsupported layer types {sorted(unknown)}")


def check_tensor_parallel(hf_model: nn.Module, tp_size: int) -> None:
    """Raise before anything starts if the model cannot be served at this tensor-parallel size: UnsupportedModel
    for what the engine cannot serve at all (or not sharded), ValueError for a size that does not divide it."""
    hf_model = unwrap_model(hf_model)
    _check_supported(hf_model)
    spread = spread_size(hf_model)
    if spread > 1 and tp_size != spread:
        raise UnsupportedModel(f"the model lies on {spread} GPUs (device_map); serve it with "
                               f"tensor_parallel_size={spread}, or load it on one GPU")
    if tp_size == 1:
        return
    if any(_is_lora_layer(module) for module in hf_model.modules()):
        raise UnsupportedModel("PEFT adapters are served at tensor_parallel_size=1 only")
    config = hf_model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    decoder_config = _decoder_config(hf_model, 0, 1)
    widths = [decoder_config.intermediate_size]
    if decoder_config.moe is not None:
        widths.append(decoder_config.moe.intermediate_size)
    if heads % tp_size or any(width % tp_size for width in widths):
        raise ValueError(f"tensor_parallel_size={tp_size} must divide the attention heads ({heads}) and the MLP "
                         f"width ({' and the expert width '.join(map(str, widths))})")
    if kv_heads % tp_size and tp_size % kv_heads:
        raise ValueError(f"tensor_parallel_size={tp_size} must divide the {kv_heads} KV heads or be a multiple of "
                         "them (KV heads are then replicated)")


def spread_size(hf_model: nn.Module) -> int:
    """How many GPUs the model's weights lie on (``device_map="auto"`` spreads a big model over several): the
    tensor-parallel size that serves it where it is. UnsupportedModel for weights offloaded to the CPU or disk."""
    devices = model_devices(hf_model)
    if len(devices) > 1 and any(device.type != "cuda" for device in devices):
        kinds = ", ".join(sorted({str(device) for device in devices}))
        raise UnsupportedModel(f"the model's weights are spread over {kinds} (offloaded); the engine serves weights "
                               "on one device, or sharded over GPUs")
    return max(1, len(devices))


def model_devices(hf_model: nn.Module) -> list[torch.device]:
    """The devices the model's parameters lie on, its embedding's first (where rank 0 goes)."""
    hf_model = unwrap_model(hf_model)
    try:
        devices = [hf_model.get_input_embeddings().weight.device]
    except (AttributeError, NotImplementedError):
        devices = []
    for param in hf_model.parameters():
        if param.device not in devices:
            devices.append(param.device)
    return devices


def _embedding_scale(hf_model: nn.Module) -> float | None:
    """Gemma's embedding multiplier, rounded to the model dtype exactly as HF rounds it: transformers 5 casts its
    fp32 ``embed_scale`` buffer; 4.x Gemma 2 builds ``torch.tensor(hidden_size**0.5, dtype=...)`` from the double."""
    embedding = hf_model.model.embed_tokens
    dtype = embedding.weight.dtype
    if _is_scaled_embedding(embedding):
        return float(embedding.embed_scale.to(dtype))
    if type(hf_model).__name__ in GEMMA_ARCHITECTURES:
        return float(torch.tensor(hf_model.config.hidden_size**0.5, dtype=dtype, device="cpu"))
    return None


def _decoder_config(hf_model: nn.Module, tp_rank: int, tp_size: int) -> DecoderConfig:
    """Shapes and flags read from the HF modules themselves, so what HF computes is what we mirror."""
    config, inner = hf_model.config, hf_model.model
    name = type(hf_model).__name__
    attn = inner.layers[0].self_attn
    projections = _projections(hf_model, inner.layers[0])
    sparse = [index for index, layer in enumerate(inner.layers) if _is_sparse_moe(layer)]
    dense = [layer for layer in inner.layers if not _is_sparse_moe(layer)]
    dense_gate_up = _projections(hf_model, dense[0])["gate_up"] if dense else []
    norm = inner.layers[0].input_layernorm
    tables = _rope_tables(hf_model)
    # Gemma 3 with both layer types: the full layers' table for them, the sliding layers' for those.
    main = tables.get("all") or tables.get("full_attention") or tables["sliding_attention"]
    sliding = tables.get("sliding_attention") if "full_attention" in tables else None
    longrope = _longrope_tables(hf_model)
    # A window at least max_position_embeddings long never bites, as the engine caps sequences at that length.
    window = getattr(config, "sliding_window", None)
    if window is not None and window >= config.max_position_embeddings:
        window = None
    return DecoderConfig(
        vocab_size=inner.embed_tokens.weight.shape[0],
        hidden_size=config.hidden_size,
        intermediate_size=sum(linear.out_features for linear in dense_gate_up) // 2,
        num_layers=len(inner.layers),
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=attn.head_dim,
        rms_norm_eps=norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps,
        max_position_embeddings=config.max_position_embeddings,
        rope_inv_freq=longrope.get("rope_inv_freq", getattr(main[0], main[1])),
        rope_attention_scaling=main[3],
        rope_long_inv_freq=longrope.get("rope_long_inv_freq"),
        rope_long_after=longrope.get("rope_long_after"),
        attention_scale=attn.scaling,
        qkv_bias=projections["qkv"][0].bias is not None,
        o_proj_bias=projections["o"][0].bias is not None,
        mlp_bias=bool(dense_gate_up) and dense_gate_up[0].bias is not None,
        qk_norm=hasattr(attn, "q_norm"),
        dtype=inner.embed_tokens.weight.dtype,
        tie_word_embeddings=hf_model.lm_head.weight is inner.embed_tokens.weight,
        moe=_moe_config(inner.layers, sparse) if sparse else None,
        mlp_activation=_mlp_activation(hf_model),
        layer_types=_layer_types(hf_model),
        sliding_window=window,
        sliding_rope_inv_freq=getattr(sliding[0], sliding[1]) if sliding else None,
        sliding_rope_attention_scaling=sliding[3] if sliding else 1.0,
        attn_logit_softcap=config.attn_logit_softcapping if name in ATTENTION_SOFTCAP else None,
        final_logit_softcap=config.final_logit_softcapping if name in GEMMA_ARCHITECTURES else None,
        embedding_scale=_embedding_scale(hf_model),
        norm_unit_offset=name in GEMMA_ARCHITECTURES,
        sandwich_norms=name in GEMMA_ARCHITECTURES,
        tp_rank=tp_rank,
        tp_size=tp_size,
    )


def _longrope_tables(hf_model: nn.Module) -> dict:
    """LongRoPE's two frequency tables and the length that switches them; empty for other rope types.

    LongRoPE rotates a forward pass with the long table when its longest position exceeds the original context
    (``original_max_position_embeddings``) and with the short one otherwise; HF's module holds whichever its last
    forward used, so the short table is taken from ``original_inv_freq`` and the long one computed as HF does.
    """
    rotary = hf_model.model.rotary_emb
    if rotary.rope_type != "longrope":
        return {}
    # transformers 4.x keeps original_inv_freq as a plain attribute, left behind by .to(device) until HF's first
    # forward: both tables are made where HF's own inv_freq lies.
    device = rotary.inv_freq.device
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = hf_model.config
    rope_parameters = getattr(config, "rope_parameters", None) or {}  # transformers 5; 4.x keeps it on the config
    original = rope_parameters.get("original_max_position_embeddings") or config.original_max_position_embeddings
    long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](config, device, seq_len=original + 1)
    return {"rope_inv_freq": rotary.original_inv_freq.to(device), "rope_long_inv_freq": long_inv_freq.to(device),
            "rope_long_after": original}


def _moe_config(hf_layers: nn.ModuleList, sparse: list[int]) -> MoeConfig:
    """The experts' shapes and routing flags, read from the first sparse layer's modules (``_check_moe_block``
    checked every sparse layer against the same config)."""
    experts, router = hf_layers[sparse[0]].mlp.experts, hf_layers[sparse[0]].mlp.gate
    return MoeConfig(num_experts=experts.gate_up_proj.shape[0], top_k=router.top_k,
                     intermediate_size=experts.down_proj.shape[2], norm_topk_prob=bool(router.norm_topk_prob),
                     sparse_layers=tuple(sparse))


def _bind_moe(bind: "_Binder", block: SparseMoeBlock, hf_block: nn.Module) -> None:
    """The router and the stacked expert weights: HF's own parameters at TP=1 (the layout is the engine's), each
    expert's slice of the intermediate dimension at TP>1."""
    bind.share(block.gate, "weight", hf_block.gate, "weight")
    experts = block.experts
    bind.share(experts, "gate_up_proj", hf_block.experts, "gate_up_proj", experts.shard_gate_up)
    bind.share(experts, "down_proj", hf_block.experts, "down_proj", experts.shard_down)


def _consecutive_views(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor spanning ``parts`` when they already lie one after another in one storage (a previous fuse), so a
    rebuild re-uses that storage instead of copying; None otherwise."""
    first = parts[0]
    offset = first.storage_offset()
    for part in parts:
        if not part.is_contiguous() or part.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return None
        if part.storage_offset() != offset or part.shape[1:] != first.shape[1:]:
            return None
        offset += part.numel()
    rows = sum(part.shape[0] for part in parts)
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (rows, *first.shape[1:]))


class _Binder:
    """Assigns HF tensors to decoder parameters: the HF parameter itself at TP=1; at TP>1 the shard, copied to
    ``device`` (None: left where the HF tensor is, as a view where the shard is one).

    ``sources`` lists ``(module, attribute)`` of every HF tensor read, for change detection.
    """

    def __init__(self, tp_size: int, device: torch.device | None):
        self.tp_size, self.device = tp_size, device
        self.sources: list[tuple[nn.Module, str]] = []

    def _own(self, tensor: torch.Tensor, fresh: bool = False) -> nn.Parameter:
        """``tensor`` as a parameter on ``device``: a copy, unless ``fresh`` (built here, shared with nobody) and
        already there."""
        if self.device is not None:
            tensor = tensor.to(self.device, copy=not fresh)
        return nn.Parameter(tensor, requires_grad=False)

    def share(self, module: nn.Module, name: str, hf_module: nn.Module, hf_name: str, shard=None) -> None:
        hf_param = getattr(hf_module, hf_name)
        if hf_param is None:
            return
        self.sources.append((hf_module, hf_name))
        if self.tp_size == 1:
            setattr(module, name, hf_param)
        else:
            setattr(module, name, self._own(shard(hf_param.detach()) if shard is not None else hf_param.detach()))

    def fuse(self, fused_layer: nn.Module, hf_linears: list[nn.Linear]) -> None:
        """New storage for the fused weight (and bias); at TP=1 the HF linears' parameters become views into it.

        One HF linear already holds the fused parts (Phi-3): it is shared as is, and split per part at TP>1."""
        if len(hf_linears) == 1:
            for name in ("weight", "bias"):
                self.share(fused_layer, name, hf_linears[0], name,
                           lambda full: fused_layer.fuse(list(full.split(fused_layer.full_sizes))))
            return
        for name in ("weight", "bias"):
            parts = [getattr(linear, name) for linear in hf_linears]
            if parts[0] is None:
                continue
            self.sources += [(linear, name) for linear in hf_linears]
            detached = [part.detach() for part in parts]
            if self.tp_size == 1:
                fused = _consecutive_views(detached)
                fused = fused_layer.fuse(detached) if fused is None else fused
                setattr(fused_layer, name, nn.Parameter(fused, requires_grad=False))
                for part, rows in zip(parts, fused_layer.part_slices()):
                    part.data = fused[rows]
            else:
                setattr(fused_layer, name, self._own(fused_layer.fuse(detached), fresh=True))


@torch.inference_mode(False)  # then no_grad: inference_mode(False) turns grad mode on
@torch.no_grad()
def build_decoder(hf_model: nn.Module, tp_rank: int = 0, tp_size: int = 1, group: ParallelGroup | None = None,
                  device: torch.device | None = None) -> DecoderForCausalLM:
    """A ``DecoderForCausalLM`` on the HF model's device and dtype, computing exactly what HF computes.

    At ``tp_size > 1``: rank ``tp_rank``'s shards, copied to ``device`` and communicating over ``group``; with no
    ``device``, views of the HF weights where they are (another rank's shards, to be sent to its worker).

    The HF weights that are fused (q/k/v, gate/up) become views of the decoder's tensors, so those are made as
    ordinary tensors even when a caller in ``torch.inference_mode`` builds (``accelerate``, or a rebuild after a
    weight change, run by whichever caller drives the engine): a training step through an inference tensor raises.

    Raises ``UnsupportedModel`` (a ValueError) for architectures or features the decoder does not implement.
    A ``PeftModel`` (or a model with PEFT LoRA layers) is served with its active adapters' updates added to the
    base weights' outputs; ``DecoderForCausalLM.adapter_state`` tells when that set changes.
    """
    hf_model = unwrap_model(hf_model)
    _check_supported(hf_model)
    with torch.device("meta"):
        decoder = DecoderForCausalLM(_decoder_config(hf_model, tp_rank, tp_size), group)
    bind = _Binder(tp_size, device)
    inner = hf_model.model
    # Read by _decoder_config. LongRoPE swaps HF's inv_freq between its two tables on every forward: the short one
    # is watched instead (the long one derives from the config).
    for rotary, inv_freq_name, rope_type, _ in _rope_tables(hf_model).values():
        bind.sources.append((rotary, "original_inv_freq" if rope_type == "longrope" else inv_freq_name))
    bind.share(decoder.embed_tokens, "weight", inner.embed_tokens, "weight", decoder.embed_tokens.shard)
    bind.share(decoder.norm, "weight", inner.norm, "weight")
    if decoder.config.tie_word_embeddings:
        decoder.tie_weights()
        bind.sources.append((hf_model.lm_head, "weight"))  # untying it later is a change to see
    else:
        bind.share(decoder.lm_head, "weight", hf_model.lm_head, "weight", decoder.lm_head.shard)
    for layer, hf_layer in zip(decoder.layers, inner.layers):
        attn, hf_attn, mlp = layer.self_attn, hf_layer.self_attn, layer.mlp
        projections = _projections(hf_model, hf_layer)
        bind.share(layer.input_layernorm, "weight", hf_layer.input_layernorm, "weight")
        bind.share(layer.post_attention_layernorm, "weight", hf_layer.post_attention_layernorm, "weight")
        if layer.sandwich_norms:
            bind.share(layer.pre_feedforward_layernorm, "weight", hf_layer.pre_feedforward_layernorm, "weight")
            bind.share(layer.post_feedforward_layernorm, "weight", hf_layer.post_feedforward_layernorm, "weight")
        bind.fuse(attn.qkv_proj, projections["qkv"])
        hf_o_proj = projections["o"][0]
        bind.share(attn.o_proj, "weight", hf_o_proj, "weight", attn.o_proj.shard)
        bind.share(attn.o_proj, "bias", hf_o_proj, "bias")
        if attn.q_norm is not None:
            bind.share(attn.q_norm, "weight", hf_attn.q_norm, "weight")
            bind.share(attn.k_norm, "weight", hf_attn.k_norm, "weight")
        if isinstance(mlp, SparseMoeBlock):
            _bind_moe(bind, mlp, hf_layer.mlp)
        else:
            hf_down_proj = projections["down"][0]
            bind.fuse(mlp.gate_up_proj, projections["gate_up"])
            bind.share(mlp.down_proj, "weight", hf_down_proj, "weight", mlp.down_proj.shard)
            bind.share(mlp.down_proj, "bias", hf_down_proj, "bias")
        _bind_loras(bind, hf_model, hf_layer, layer)
    if device is not None:
        for rotary in decoder.rotary_embeddings:
            rotary.cos_sin_cache = rotary.cos_sin_cache.to(device)
    left = [name for name, t in [*decoder.named_parameters(), *decoder.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"build_decoder left parameters unassigned: {left[:5]}")
    decoder.weight_sources = bind.sources
    has_lora = any(_is_lora_layer(module) for module in hf_model.modules())
    decoder.adapter_state = (lambda: lora_state(hf_model)) if has_lora else None
    return decoder.eval()
