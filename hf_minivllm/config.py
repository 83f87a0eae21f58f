"""Engine configuration: nano-vllm's names and defaults, validated with messages that name the argument."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ATTENTION_BACKENDS = ("auto", "torch", "triton", "flash_attn")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")

# 16 tokens per KV block: the internal waste per sequence is half a block on average (8 tokens), prefix-cache
# hits come at 16-token granularity, and our Triton kernels take any power of two, so nothing forces the
# 256-token pages of flash-attn's paged path (flash-attn 4 measured the same bandwidth for pages of 16 to 256).
DEFAULT_KVCACHE_BLOCK_SIZE = 16


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Config:
    """Everything the engine needs besides the model weights.

    ``model`` is a local model folder or an already loaded ``transformers`` model. ``max_model_len`` is capped by
    the model's ``max_position_embeddings``. ``num_kvcache_blocks=-1`` sizes the KV cache from
    ``gpu_memory_utilization`` on CUDA (on CPU from ``cpu_kvcache_space_gib``), or from ``kv_cache_memory_gib``
    when given. ``kv_cache_resident``: True allocates the whole KV cache up front and keeps it (``LLM``'s default);
    False starts with room for one ``max_model_len`` sequence, grows with the requests in hand up to that size, and
    hands the memory back whenever the engine is idle (``accelerate``'s default). ``mixed_steps``: running requests
    decode in every step while waiting prompts are prefilled in chunks beside them (one token budget per step,
    ``max_num_batched_tokens``); off, a step either prefills or decodes. ``async_scheduling`` schedules and
    prepares the next step while the current one runs on the device (the host never waits for a step before
    queueing the next); steps with HF logits processors or stopping criteria always run one at a time.
    ``tensor_parallel_size``: the model is sharded over that many GPUs (processes on CPU; see ``hf_minivllm.tp``).
    ``max_prefill_graph_tokens``: on CUDA (unless ``enforce_eager``), a step's prompt chunks totalling at most this
    many tokens run through CUDA graphs captured at start-up, like decode steps, instead of one eager launch per
    kernel (0: prompts always run eagerly); larger prefills run eagerly, where the device work outweighs the
    launches. ``kv_cache_dtype``: ``auto`` stores keys and values in the model's dtype; ``fp8`` (``fp8_e4m3``) in
    e4m3 with a key and a value scale per layer, calibrated on a pass over random tokens when the engine builds
    its decoder (half the memory and bandwidth of a 16-bit cache; the ``torch`` and ``triton`` backends read it).
    Weights changed in place later keep those scales (KV already cached was written with them); keys or values
    past twice the calibrated range saturate. ``cascade_attention``: a decode step of many sequences sharing a long
    prefix (prefix caching's shared pages, e.g. one system prompt) reads the prefix's keys and values once per tile
    of up to 16 sequences instead of once per sequence (Triton backend, full-precision cache; see ``ModelRunner``).
    """

    model: Any = None
    max_num_batched_tokens: int = 16384
    max_num_seqs: int = 512
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    kvcache_block_size: int = DEFAULT_KVCACHE_BLOCK_SIZE
    num_kvcache_blocks: int = -1
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    cpu_kvcache_space_gib: float = 4.0
    async_scheduling: bool = True
    kv_cache_resident: bool | None = None
    kv_cache_memory_gib: float | None = None
    mixed_steps: bool = True
    max_prefill_graph_tokens: int = 2048
    kv_cache_dtype: str = "auto"
    cascade_attention: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len", "tensor_parallel_size"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"Config.{name} must be a positive integer, got {value!r}")
        if not _is_int(self.max_prefill_graph_tokens) or self.max_prefill_graph_tokens < 0:
            raise ValueError("Config.max_prefill_graph_tokens must be a non-negative integer (0: no prefill graphs), "
                             f"got {self.max_prefill_graph_tokens!r}")
        size = self.kvcache_block_size
        if not _is_int(size) or size <= 0 or size & (size - 1):
            raise ValueError(f"Config.kvcache_block_size must be a power of two, got {size!r}")
        if not _is_int(self.num_kvcache_blocks) or (self.num_kvcache_blocks != -1 and self.num_kvcache_blocks <= 0):
            raise ValueError(f"Config.num_kvcache_blocks must be -1 (auto) or a positive integer, got {self.num_kvcache_blocks!r}")
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"Config.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if not isinstance(self.cpu_kvcache_space_gib, (int, float)) or self.cpu_kvcache_space_gib <= 0:
            raise ValueError(f"Config.cpu_kvcache_space_gib must be > 0, got {self.cpu_kvcache_space_gib!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"Config.attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        for name in ("enforce_eager", "enable_prefix_caching", "async_scheduling", "mixed_steps", "cascade_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Config.{name} must be a boolean, got {getattr(self, name)!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"Config.kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.kv_cache_dtype != "auto" and self.attention_backend == "flash_attn":
            raise ValueError(f"Config.kv_cache_dtype={self.kv_cache_dtype!r} needs attention_backend 'triton', 'torch' "
                             "or 'auto': flash_attn does not read an FP8 cache")
        if self.kv_cache_resident is not None and not isinstance(self.kv_cache_resident, bool):
            raise ValueError(f"Config.kv_cache_resident must be True, False or None, got {self.kv_cache_resident!r}")
        if self.kv_cache_resident is False and self.tensor_parallel_size > 1:
            raise ValueError("Config.kv_cache_resident=False (an on-demand KV cache) needs tensor_parallel_size=1; "
                             "a sharded model's cache is allocated up front")
        gib = self.kv_cache_memory_gib
        if gib is not None and (isinstance(gib, bool) or not isinstance(gib, (int, float)) or not gib > 0):
            raise ValueError(f"Config.kv_cache_memory_gib must be a number of GiB > 0 or None, got {gib!r}")

    def fit_to_model(self, max_position_embeddings: int | None) -> None:
        """Cap max_model_len by the model's context window. A token budget below max_model_len is kept: longer
        prompts are prefilled in chunks."""
        if max_position_embeddings:
            self.max_model_len = min(self.max_model_len, int(max_position_embeddings))
