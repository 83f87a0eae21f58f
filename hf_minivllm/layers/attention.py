"""The attention layer: writes this step's K/V into the paged cache (or hands that write to the rotary kernel), then
attends through a chosen backend.

Backends (all read the same cache layout, ``[num_blocks, block_size, num_kv_heads, head_dim]``):

- ``torch``: gathers pages and calls SDPA; the CPU path and the reference.
- ``triton``: our paged kernels (``hf_minivllm.kernels``); any power-of-two block size, a head_dim that is a multiple
  of 8 from 16 to 256 (Phi-3-mini's 96 included: tiles pad the head to a power of two); the default on CUDA.
- ``flash_attn``: flash-attn 4 (``flash_attn.cute``) when it imports, else flash-attn 2. fp16/bf16 only.
  FA4 addresses pages through ``page_table`` + ``seqused_k`` (it rejects ``cu_seqlens_k`` with a page table) and
  takes any page size on Hopper (4.0.0b36 on the H100: same decode bandwidth for pages of 16 to 256; it has no
  split-KV there, so batch-1 decode is several times slower than our Triton kernel). FA2 takes ``block_table``,
  whose paged path needs a block size that is a multiple of 256.

A layer may have a sliding window (the query sees its last ``sliding_window`` keys, itself included: HF's
``kv_idx > q_idx - sliding_window``) and a logit soft-cap (``cap * tanh(score / cap)`` before the softmax). Every
backend takes both: flash-attn as ``window_size=(sliding_window - 1, 0)`` (keys ``[i - left, i + right]``) and
``softcap``, in both versions.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

from hf_minivllm.kernels.attention_math import check_attention_options
from hf_minivllm.kernels.decode_attention import (cascade_decode_attention, paged_decode_attention,
                                                  paged_decode_attention_torch)
from hf_minivllm.kernels.kv_cache import KVCacheWrite, store_kvcache, store_kvcache_torch
from hf_minivllm.kernels.paged_inputs import HEAD_DIM_RULE, kernels_take_head_dim
from hf_minivllm.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_torch
from hf_minivllm.layers.context import get_attention_metadata

BACKENDS = ("torch", "triton", "flash_attn")
_FLASH_ATTN_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_ATTN2_PAGE_MULTIPLE = 256


@functools.lru_cache(maxsize=1)
def _flash_attn() -> SimpleNamespace | None:
    """The installed flash-attn entry points (version 4 preferred), or None when none imports."""
    try:
        from flash_attn.cute import flash_attn_varlen_func
        return SimpleNamespace(version=4, varlen=flash_attn_varlen_func)
    except Exception:  # noqa: BLE001 - a broken install (CUDA/DSL mismatch) is as good as none
        pass
    try:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
        return SimpleNamespace(version=2, varlen=flash_attn_varlen_func, with_kvcache=flash_attn_with_kvcache)
    except Exception:  # noqa: BLE001
        return None


@functools.lru_cache(maxsize=1)
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


def _flash_attn_unsupported(block_size: int | None, dtype: torch.dtype | None) -> str | None:
    """Why the installed flash-attn cannot serve this cache, or None when it can."""
    flash = _flash_attn()
    if flash is None:
        return "the flash_attn package does not import"
    if dtype is not None and dtype not in _FLASH_ATTN_DTYPES:
        return f"flash-attn supports fp16/bf16 only, not {dtype}"
    if flash.version == 2 and block_size is not None and block_size % _FLASH_ATTN2_PAGE_MULTIPLE:
        return f"flash-attn 2's paged KV needs a block size that is a multiple of 256, not {block_size}"
    return None


def select_attention_backend(name: str, device: torch.device | str, *, block_size: int | None = None,
                             dtype: torch.dtype | None = None, head_dim: int | None = None) -> str:
    """Resolve a configured backend name (``auto`` or one of ``BACKENDS``) for ``device``.

    ``auto``: ``flash_attn`` on CUDA when it imports and fits the cache (``block_size``/``dtype``, when given),
    else ``triton`` on CUDA when its kernels take the heads (``head_dim``, when given: a multiple of 8 from 16 to
    256, Phi-3-mini's 96 included), ``torch`` elsewhere. An explicit name that cannot run raises ``ValueError``.
    """
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    triton_takes_heads = head_dim is None or kernels_take_head_dim(head_dim)
    if name == "auto":
        if on_cuda and _flash_attn_unsupported(block_size, dtype) is None:
            return "flash_attn"
        if on_cuda and _triton_available() and triton_takes_heads:
            return "triton"
        return "torch"
    if name == "torch":
        return name
    if name == "triton":
        if not on_cuda:
            raise ValueError(f"attention backend 'triton' needs a CUDA device, not {device}; use 'torch' or 'auto'")
        if not _triton_available():
            raise ValueError("attention backend 'triton' needs the triton package, which does not import")
        if not triton_takes_heads:
            raise ValueError(f"attention backend 'triton' needs {HEAD_DIM_RULE}, not head_dim {head_dim}; "
                             "use 'torch' or 'auto'")
        return name
    if name == "flash_attn":
        if not on_cuda:
            raise ValueError(f"attention backend 'flash_attn' needs a CUDA device, not {device}; use 'torch' or 'auto'")
        reason = _flash_attn_unsupported(block_size, dtype)
        if reason is not None:
            raise ValueError(f"attention backend 'flash_attn' is unavailable: {reason}")
        return name
    raise ValueError(f"unknown attention backend {name!r}; expected 'auto' or one of {BACKENDS}")


def _flash_options(sliding_window: int | None, softcap: float | None) -> dict:
    """flash-attn keyword arguments for a window and a soft-cap (none when neither is set, so the plain call stays
    as it was). With ``causal=True`` the window is bottom-right aligned, keys ``[i - left, i]``: HF's window."""
    options = {}
    if sliding_window is not None:
        options["window_size"] = (sliding_window - 1, 0)
    if softcap is not None:
        options["softcap"] = softcap
    return options


def _flash_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                   cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, block_tables: torch.Tensor,
                   softmax_scale: float, *, sliding_window: int | None = None,
                   softcap: float | None = None) -> torch.Tensor:
    flash = _flash_attn()
    options = _flash_options(sliding_window, softcap)
    if flash.version == 4:
        # FA4 pages are addressed by page_table + per-sequence lengths (it rejects cu_seqlens_k with a page table).
        context_lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
        out = flash.varlen(q, k_cache, v_cache, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q,
                           max_seqlen_k=max_seqlen_k, seqused_k=context_lens, page_table=block_tables,
                           softmax_scale=softmax_scale, causal=True, **options)
        return out[0] if isinstance(out, tuple) else out
    return flash.varlen(q, k_cache, v_cache, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale, causal=True,
                        block_table=block_tables, **options)


def _flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context_lens: torch.Tensor,
                  block_tables: torch.Tensor, softmax_scale: float, *, sliding_window: int | None = None,
                  softcap: float | None = None) -> torch.Tensor:
    flash = _flash_attn()
    options = _flash_options(sliding_window, softcap)
    if flash.version == 4:
        out = flash.varlen(q.unsqueeze(1), k_cache, v_cache, seqused_k=context_lens, page_table=block_tables,
                           max_seqlen_k=block_tables.shape[1] * k_cache.shape[1], softmax_scale=softmax_scale,
                           causal=True, **options)
        out = out[0] if isinstance(out, tuple) else out
    else:
        out = flash.with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=context_lens,
                                 block_table=block_tables, softmax_scale=softmax_scale, causal=True, **options)
    return out.squeeze(1)


_PREFILL: dict[str, Callable[..., torch.Tensor]] = {
    "torch": paged_prefill_attention_torch, "triton": paged_prefill_attention, "flash_attn": _flash_prefill,
}
_DECODE: dict[str, Callable[..., torch.Tensor]] = {
    "torch": paged_decode_attention_torch, "triton": paged_decode_attention, "flash_attn": _flash_decode,
}


def _contiguous_as_cache(k: torch.Tensor, v: torch.Tensor, cu_seqlens_k: torch.Tensor,
                         max_seqlen_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """View packed ``[tokens, kv_heads, head_dim]`` K/V as a cache of one-token pages plus its block table."""
    offsets = torch.arange(max(max_seqlen_k, 1), device=k.device, dtype=torch.int32)
    block_tables = (cu_seqlens_k[:-1, None] + offsets[None, :]).clamp_(max=max(k.shape[0] - 1, 0))
    return k.unsqueeze(1).contiguous(), v.unsqueeze(1).contiguous(), block_tables.to(torch.int32).contiguous()


class Attention(nn.Module):
    """Paged-KV attention for one decoder layer.

    ``forward(q [T, heads*head_dim], k, v [T, kv_heads*head_dim]) -> [T, heads*head_dim]``, with the step's
    layout read from ``get_attention_metadata()``; ``stored=True`` when the step's K/V are in the cache already
    (written through ``cache_write()``). ``k_cache``/``v_cache`` are assigned by the model runner;
    while they are empty (a warm-up or memory-profiling pass before the cache exists) a prefill attends over
    this step's K/V alone and nothing is stored. ``backend`` is set by the runner (see
    ``select_attention_backend``). ``sliding_window`` and ``softcap`` (None: off) are per layer (see the module
    doc); every key stays in the cache, only attention skips those outside the window.

    An FP8 cache comes with ``kv_scales`` ([2] float32: the key and the value scale, set by the runner). While
    ``kv_amax`` is a tensor, every forward raises it to the largest key and value magnitudes seen (the runner's
    calibration of those scales; no host sync).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, softcap: float | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        check_attention_options(sliding_window, softcap)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.softcap = softcap
        self.backend = "torch"
        self.k_cache = torch.tensor([])
        self.v_cache = torch.tensor([])
        self.kv_scales: torch.Tensor | None = None
        self.kv_amax: torch.Tensor | None = None

    def cache_write(self) -> KVCacheWrite | None:
        """This step's write of the keys and values to the cache, for the rotary kernel to do as it rotates them
        (``forward(..., stored=True)`` then skips it); None where ``forward`` writes itself: no cache bound yet,
        the torch backend, an FP8 cache (see ``hf_minivllm.kernels.rotary``), or a calibration pass."""
        if (self.backend == "torch" or self.kv_scales is not None or self.kv_amax is not None
                or not self._has_cache()):
            return None
        return KVCacheWrite(self.k_cache, self.v_cache, get_attention_metadata().slot_mapping)

    def _has_cache(self) -> bool:
        return self.k_cache.numel() > 0 and self.v_cache.numel() > 0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stored: bool = False) -> torch.Tensor:
        metadata = get_attention_metadata()
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.kv_amax is not None:
            torch.maximum(self.kv_amax, torch.stack([k.abs().amax(), v.abs().amax()]).float(), out=self.kv_amax)
        k_cache, v_cache = self.k_cache, self.v_cache
        has_cache = self._has_cache()
        if has_cache and not stored:
            store = store_kvcache_torch if self.backend == "torch" else store_kvcache
            store(k, v, k_cache, v_cache, metadata.slot_mapping, **self._scales())
        if metadata.is_prefill and not has_cache:
            out = self._attend_uncached(q, k, v, metadata.cu_seqlens_q, metadata.cu_seqlens_k,
                                        metadata.max_seqlen_q, metadata.max_seqlen_k)
        elif metadata.is_prefill:
            out = _PREFILL[self.backend](q, k_cache, v_cache, metadata.cu_seqlens_q, metadata.cu_seqlens_k,
                                         metadata.max_seqlen_q, metadata.max_seqlen_k, metadata.block_tables,
                                         self.scale, **self._options(), **self._scales())
        elif has_cache and metadata.shared_prefix_len is not None and self._takes_cascade():
            out = cascade_decode_attention(q, k_cache, v_cache, metadata.context_lens, metadata.block_tables,
                                           self.scale, metadata.shared_prefix_len, softcap=self.softcap)
        elif has_cache:
            out = _DECODE[self.backend](q, k_cache, v_cache, metadata.context_lens, metadata.block_tables, self.scale,
                                        **self._options(), **self._scales())
        else:
            raise RuntimeError("decode attention needs the KV cache: the model runner has not assigned k_cache/v_cache")
        return out.reshape(-1, self.num_heads * self.head_dim)

    def _attend_uncached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int) -> torch.Tensor:
        """Causal varlen attention over this step's packed K/V (no cache yet, hence no prefix)."""
        if self.backend == "flash_attn":
            out = _flash_attn().varlen(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                       max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, softmax_scale=self.scale,
                                       causal=True, **_flash_options(self.sliding_window, self.softcap))
            return out[0] if isinstance(out, tuple) else out
        k_pages, v_pages, block_tables = _contiguous_as_cache(k, v, cu_seqlens_k, max_seqlen_k)
        return _PREFILL[self.backend](q, k_pages, v_pages, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      block_tables, self.scale, **self._options())

    def _takes_cascade(self) -> bool:
        """Whether a decode step's shared prefix can be read once per tile of sequences here: the Triton backend,
        a full-precision cache, no sliding window (those layers attend as usual)."""
        return self.backend == "triton" and self.kv_scales is None and self.sliding_window is None

    def _options(self) -> dict:
        return dict(sliding_window=self.sliding_window, softcap=self.softcap)

    def _scales(self) -> dict:
        """The FP8 cache's scales for the kernels (nothing for a plain cache, so flash-attn's calls stay as they
        were)."""
        return {} if self.kv_scales is None else dict(kv_scales=self.kv_scales)

    def extra_repr(self) -> str:
        extra = "".join(f", {name}={value}" for name, value in self._options().items() if value is not None)
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"scale={self.scale}, backend={self.backend}{extra}")
