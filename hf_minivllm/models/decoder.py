"""One compact pre-norm decoder for Llama, Mistral, Phi-3, Qwen2, Qwen3, Qwen3-MoE, Gemma 2 and Gemma 3, on flat packed
tokens.

The families differ only in flags: q/k/v bias (Qwen2), per-head q/k RMSNorm before RoPE (Qwen3, Gemma 3), MLP and
o_proj bias (some Llamas), sliding-window layers (Mistral, Phi-3, some Qwen2/3, Gemma), a sparse MoE block instead
of the MLP on the layers ``DecoderConfig.moe`` names (Qwen3-MoE), LongRoPE's second table (Phi-3), and Gemma's set:
norms scaling by ``1 + weight``, a norm on each sublayer's output too ("sandwich"), GELU-tanh MLP, a scaled
embedding, soft-capped attention (Gemma 2) and final logits, a second RoPE table for the sliding layers (Gemma 3).
Tokens of all sequences in a step are packed along one axis (no batch dim, no padding); where each token's K/V
lives is told to the attention layers through ``hf_minivllm.layers.context``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from hf_minivllm.layers.activation import GeluTanhAndMul, SiluAndMul
from hf_minivllm.layers.attention import Attention
from hf_minivllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from hf_minivllm.layers.layernorm import RMSNorm
from hf_minivllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from hf_minivllm.layers.moe import MoeConfig, SparseMoeBlock
from hf_minivllm.layers.parallel import ParallelGroup
from hf_minivllm.layers.rotary import RotaryEmbedding


@dataclass
class DecoderConfig:
    """Shapes and per-family flags; sizes are the full (unsharded) model's, heads are split by ``tp_size``.

    ``layer_types`` ("full_attention" / "sliding_attention" per layer, HF's names; empty: all full) picks the
    layers that attend within ``sliding_window`` (None: no window bites) and that rotate with the
    ``sliding_rope_*`` table when there is one (Gemma 3).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_inv_freq: torch.Tensor
    rope_attention_scaling: float = 1.0
    # LongRoPE (Phi-3): a second frequency table, used by tokens of sequences longer than ``rope_long_after``.
    rope_long_inv_freq: torch.Tensor | None = None
    rope_long_after: int | None = None
    attention_scale: float | None = None
    qkv_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    dtype: torch.dtype = torch.float32
    tie_word_embeddings: bool = False
    moe: MoeConfig | None = None
    mlp_activation: str = "silu"
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    sliding_rope_inv_freq: torch.Tensor | None = None
    sliding_rope_attention_scaling: float = 1.0
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    embedding_scale: float | None = None  # a value of the model dtype: a Python float multiplies as HF's tensor does
    norm_unit_offset: bool = False
    sandwich_norms: bool = False
    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self):
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f"mlp_activation must be one of {tuple(MLP_ACTIVATIONS)}, got {self.mlp_activation!r}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(f"{len(self.layer_types)} layer_types for {self.num_layers} layers")

    def is_sliding(self, layer_index: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer_index] == "sliding_attention"


MLP_ACTIVATIONS = {"silu": SiluAndMul, "gelu_tanh": GeluTanhAndMul}


class DecoderAttention(nn.Module):
    """qkv projection -> (q/k norm) -> RoPE -> paged attention -> o_proj."""

    def __init__(self, config: DecoderConfig, rotary_emb: RotaryEmbedding, tp: dict, sliding: bool = False):
        super().__init__()
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads,
                                          bias=config.qkv_bias, **tp)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(config.num_heads * config.head_dim, config.hidden_size,
                                        bias=config.o_proj_bias, **tp)
        norm = dict(eps=config.rms_norm_eps, unit_offset=config.norm_unit_offset)
        self.q_norm = RMSNorm(config.head_dim, **norm) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, **norm) if config.qk_norm else None
        self.rotary_emb = rotary_emb  # one module shared by every layer (of its kind)
        scale = config.attention_scale if config.attention_scale is not None else config.head_dim**-0.5
        self.attn = Attention(self.num_heads, self.num_kv_heads, config.head_dim, scale,
                              sliding_window=config.sliding_window if sliding else None,
                              softcap=config.attn_logit_softcap)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.output_sizes, dim=-1)
        # One launch on CUDA: q/k norms (Gemma 3's apart), RoPE, and the keys' and values' write to the paged cache.
        write = self.attn.cache_write() if self.rotary_emb.uses_kernel(q) else None
        q, k = self.rotary_emb(positions, q, k, self.q_norm, self.k_norm, v=v if write is not None else None,
                               write=write)
        out = self.attn(q.reshape(x.shape[0], -1), k.reshape(x.shape[0], -1), v, stored=write is not None)
        return self.o_proj(out)


class DecoderMLP(nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)) with gate and up fused into one GEMM."""

    def __init__(self, config: DecoderConfig, tp: dict):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], bias=config.mlp_bias, **tp)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=config.mlp_bias, **tp)
        self.act = MLP_ACTIVATIONS[config.mlp_activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm block; the residual stream is carried separately so each norm can fuse the preceding add.

    With ``sandwich_norms`` (Gemma) ``post_attention_layernorm`` and ``post_feedforward_layernorm`` normalise the
    attention and MLP outputs before their residual adds, which ``pre_feedforward_layernorm`` and the next layer's
    ``input_layernorm`` fuse; otherwise ``post_attention_layernorm`` is the MLP's input norm (HF's names).
    """

    def __init__(self, config: DecoderConfig, rotary_emb: RotaryEmbedding, tp: dict, index: int,
                 sliding: bool = False):
        super().__init__()
        self.self_attn = DecoderAttention(config, rotary_emb, tp, sliding)
        if config.moe is not None and index in config.moe.sparse_layers:
            self.mlp = SparseMoeBlock(config.hidden_size, config.moe, **tp)
        else:
            self.mlp = DecoderMLP(config, tp)
        norm = dict(eps=config.rms_norm_eps, unit_offset=config.norm_unit_offset)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
        self.sandwich_norms = config.sandwich_norms
        if config.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, **norm)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, **norm)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        if self.sandwich_norms:
            hidden, residual = self.pre_feedforward_layernorm(self.post_attention_layernorm(hidden), residual)
            return self.post_feedforward_layernorm(self.mlp(hidden)), residual
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderForCausalLM(nn.Module):
    """``forward(input_ids [T], positions [T]) -> hidden [T, hidden]``; ``compute_logits`` projects chosen rows.

    Parameters are left uninitialised: build it under ``torch.device("meta")`` and assign real tensors (see
    ``hf_minivllm.models.adapter.build_decoder``). The runner assigns each of ``attention_layers``' ``k_cache`` and
    ``v_cache`` (``[num_blocks, block_size, num_kv_heads, head_dim]``, ``num_kv_heads`` being this rank's).

    At ``config.tp_size > 1`` the layers hold rank ``config.tp_rank``'s shards and communicate over ``group``
    (None for a rank's shards built only to be sent to that rank's worker).
    """

    def __init__(self, config: DecoderConfig, group: ParallelGroup | None = None):
        super().__init__()
        self.config = config
        self.group = group
        tp = dict(tp_rank=config.tp_rank, tp_size=config.tp_size, group=group)
        self.vocab_size = config.vocab_size
        self.num_layers = config.num_layers
        self.head_dim = config.head_dim
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, **tp)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_inv_freq, config.rope_attention_scaling,
                                          config.max_position_embeddings, config.dtype, config.rope_long_inv_freq)
        # Where the long table's rows start in the rotary cache, and the length past which a sequence uses them
        # (see ``ModelRunner``'s rope positions); None without a long table.
        self.rope_long_after = config.rope_long_after if config.rope_long_inv_freq is not None else None
        self.rope_long_offset = self.rotary_emb.long_offset
        self.sliding_rotary_emb = None
        if config.sliding_rope_inv_freq is not None:
            self.sliding_rotary_emb = RotaryEmbedding(config.head_dim, config.sliding_rope_inv_freq,
                                                      config.sliding_rope_attention_scaling,
                                                      config.max_position_embeddings, config.dtype)
        self.rotary_embeddings = [rotary for rotary in (self.rotary_emb, self.sliding_rotary_emb) if rotary is not None]
        self.layers = nn.ModuleList(
            DecoderLayer(config, self._rotary_for(config.is_sliding(index)), tp, index, config.is_sliding(index))
            for index in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=config.norm_unit_offset)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, **tp)
        self.tie_weights()
        self.num_kv_heads = self.layers[0].self_attn.num_kv_heads
        self.attention_layers: list[Attention] = [layer.self_attn.attn for layer in self.layers]
        self._layer_subset: list[int] | None = None  # see only_layers

    def variant_layers(self) -> list[int]:
        """Layers whose kernel launches cover every layer's kernel variants: the first (its norm has no residual to
        add yet), the second (the add fused into its norm), and the first of each other kind (a sliding window, a MoE
        block, weights of another dtype, 16-byte alignment or strides, which Triton specialises on). Another layer of
        a kind launches the same kernels on the same shapes."""
        chosen, kinds = [], set()
        for index, layer in enumerate(self.layers):
            weights = tuple((param.dtype, param.data_ptr() % 16 == 0, param.stride()) for param in layer.parameters())
            kind = (self.config.is_sliding(index), type(layer.mlp), weights)
            if index < 2 or kind not in kinds:
                chosen.append(index)
                kinds.add(kind)
        return chosen

    @contextlib.contextmanager
    def only_layers(self, indices: list[int]) -> Iterator[None]:
        """Forward passes inside the block run only these layers: start-up's compile passes and the warm-ups before
        graph captures, whose outputs nobody reads, need each kernel variant once, not 28 times over."""
        self._layer_subset = list(indices)
        try:
            yield
        finally:
            self._layer_subset = None

    def _rotary_for(self, sliding: bool) -> RotaryEmbedding:
        return self.sliding_rotary_emb if sliding and self.sliding_rotary_emb is not None else self.rotary_emb

    def tie_weights(self) -> None:
        """Share the embedding's weight with the LM head when the model ties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        if self.config.embedding_scale is not None:
            hidden = hidden * self.config.embedding_scale
        layers = self.layers if self._layer_subset is None else [self.layers[index] for index in self._layer_subset]
        for layer in layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[n, hidden] -> [n, vocab]`` in the model dtype, full vocabulary on every rank; soft-capped as HF does
        (``logits / cap``, ``tanh``, ``* cap``) when the model caps them."""
        logits = self.lm_head(hidden_states)
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
