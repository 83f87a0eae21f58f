"""Turns a scheduled batch into model inputs, runs the decoder, and samples the next tokens.

Owns the paged KV cache (one tensor, a view of it per attention layer) and, on CUDA, the captured decode graphs.
A step is first planned on the host (``hf_minivllm.engine.step_plan``), then run. With tensor parallelism, rank 0's
runner hands each plan to the other ranks' runners (``workers``) before running it itself, samples alone, and
broadcasts the sampled tokens, which the next step's pending inputs come from on every rank.
"""
from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from torch import nn

from hf_minivllm.config import Config
from hf_minivllm.engine.cuda_graphs import DecodeGraphs, DecodeInputs, PrefillGraphs, batch_buckets
from hf_minivllm.engine.cuda_vmm import virtual_memory_available
from hf_minivllm.engine.decode_tables import DecodeBlockTables, shared_prefix_blocks
from hf_minivllm.engine.kv_storage import (
    FixedKVStorage,
    KVCacheStorage,
    KVLayout,
    ReallocKVStorage,
    VirtualKVStorage,
    growth_budget,
)
from hf_minivllm.engine.scheduler import ScheduledBatch
from hf_minivllm.engine.sequence import Sequence
from hf_minivllm.engine.step_hooks import apply_step_hooks
from hf_minivllm.engine.step_plan import DecodePlan, PrefillPlan, StepPlan
from hf_minivllm.kernels.kv_cache import FP8_DTYPE, FP8_MAX
from hf_minivllm.kernels.launch import can_compile_ahead, compile_ahead
from hf_minivllm.layers.attention import select_attention_backend
from hf_minivllm.layers.context import AttentionMetadata, set_attention_metadata
from hf_minivllm.layers.sampler import GREEDY, SamplingTensors, row_chunks, sample
from hf_minivllm.sampling_params import MAX_LOGPROBS, SamplingParams

logger = logging.getLogger(__name__)

GIB = 1 << 30
# Sequences a prefill graph takes: a step's prompts (and, without a decode graph pass, its decode rows) beyond this
# run eagerly. The attention grid has a tile column per sequence, mostly empty, so it is kept modest.
PREFILL_GRAPH_SEQS = 32
# FP8 KV cache calibration: a pass over this many random tokens, and scales with this much room above the largest
# key and value it saw (larger ones saturate at e4m3's largest value).
KV_CALIBRATION_TOKENS = 512
KV_SCALE_HEADROOM = 2.0
# Cascade attention (Config.cascade_attention) for decode steps of at least this many sequences sharing at least this
# many tokens' pages, where the repeated prefix reads it saves clearly outweigh its two extra kernels per layer (not
# tuned: W3, 256 sequences sharing 2,048 tokens, is the one shape measured).
CASCADE_MIN_SEQS = 32
CASCADE_MIN_PREFIX_TOKENS = 512


class TensorParallelPeers(Protocol):
    """Rank 0's handle on the other ranks' runners (``hf_minivllm.tp.workers``)."""

    def start_runner(self, config: Config, eos_token_ids: list[int]) -> None: ...
    def wait_ready(self) -> None: ...
    def step(self, plan: StepPlan) -> None: ...
    def wait(self, event: torch.cuda.Event) -> None: ...
    def check(self, error: BaseException | None = None) -> None: ...
    def fail(self, reason: str) -> None: ...
    def close_runner(self) -> None: ...
    @property
    def closed(self) -> bool: ...


def compiles_kernels_ahead(device: torch.device) -> bool:
    """Whether start-up compiles its Triton kernels concurrently (``hf_minivllm.kernels.launch``): on CUDA, with a
    Triton that has the asynchronous compile mode."""
    return device.type == "cuda" and can_compile_ahead()


def captures_cuda_graphs(device: torch.device, backend: str, enforce_eager: bool) -> bool:
    """Whether the runner replays its passes through CUDA graphs: on CUDA unless ``enforce_eager``, and not with the
    torch backend, whose KV store and prefill read lengths on the host (not allowed while a graph is captured)."""
    return device.type == "cuda" and not enforce_eager and backend != "torch"


class ModelRunner:
    """One model on one device: its KV cache storage, decode graphs, input preparation and sampling.

    ``workers``: on rank 0 of a tensor-parallel model, the other ranks' runners, built alongside this one and
    given every step's plan.
    """

    def __init__(self, model: nn.Module, config: Config, eos_token_ids: list[int],
                 workers: TensorParallelPeers | None = None):
        self.model = model
        self.group = getattr(model, "group", None)
        self.workers = workers
        if workers is not None:
            workers.start_runner(config, list(eos_token_ids))
        self.eos_token_ids = list(eos_token_ids)
        self._banned_columns: dict[tuple[int, ...], torch.Tensor] = {}  # min_tokens: banned ids on the device
        self.config = config
        self.device = model.device
        self.dtype = model.dtype
        self.block_size = config.kvcache_block_size
        self.max_blocks_per_seq = (config.max_model_len + self.block_size - 1) // self.block_size
        fp8_cache = config.kv_cache_dtype != "auto"
        backend = select_attention_backend(config.attention_backend, self.device, block_size=self.block_size,
                                           dtype=FP8_DTYPE if fp8_cache else self.dtype, head_dim=model.head_dim)
        if fp8_cache and backend == "triton" and torch.cuda.get_device_capability(self.device) < (8, 9):
            raise ValueError(f"kv_cache_dtype={config.kv_cache_dtype!r} with the triton backend needs a GPU of compute "
                             f"capability 8.9 or newer (Ada, Hopper) for e4m3; {torch.cuda.get_device_name(self.device)} "
                             "has less: use attention_backend='torch' or kv_cache_dtype='auto'")
        for layer in model.attention_layers:
            layer.backend = backend
        self.attention_backend = backend
        self._cascade = (config.cascade_attention and backend == "triton" and not fp8_cache
                         and config.max_num_seqs >= CASCADE_MIN_SEQS
                         and any(layer.sliding_window is None for layer in model.attention_layers))
        self._decode_tables = DecodeBlockTables(config.max_num_seqs, self.max_blocks_per_seq)
        # The draw of unseeded sampled rows (see _sampling_tensors): the runner's own, never torch's CUDA default.
        self._draws = torch.Generator(device=self.device)
        self._rope_long_after = getattr(model, "rope_long_after", None)
        self._rope_long_offset = getattr(model, "rope_long_offset", 0)
        self.layout = KVLayout(model.num_layers, self.block_size, model.num_kv_heads, model.head_dim,
                               FP8_DTYPE if fp8_cache else self.dtype)
        self._growth_budget: Callable[[], int] | None = None
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None  # none yet: the memory profile's warm-up runs eagerly
        self.variant_layers = self._agreed_variant_layers()
        if fp8_cache:  # the compile passes launch the FP8 kernels, which take scales; what they write is never read
            for layer in model.attention_layers:
                layer.kv_scales = torch.ones(2, dtype=torch.float32, device=self.device)
        if compiles_kernels_ahead(self.device):
            self._compile_kernels_ahead()
        if fp8_cache:  # after the passes: its forward runs every layer, and would compile their kernels one by one
            self._calibrate_kv_scales()
        self.storage = self._make_storage()
        self._bind_kv_cache(self.storage.tensor)
        if captures_cuda_graphs(self.device, backend, config.enforce_eager):
            self.graphs = DecodeGraphs(self, config.max_num_seqs)
            graph_tokens = min(config.max_prefill_graph_tokens, config.max_num_batched_tokens)
            if graph_tokens and backend == "triton":  # flash-attn's grid follows the batch: not captured
                self.prefill_graphs = PrefillGraphs(self, graph_tokens, min(config.max_num_seqs, PREFILL_GRAPH_SEQS),
                                                    pool=self.graphs.pool, stream=self.graphs.capture_stream)
        if workers is not None:
            workers.wait_ready()

    @property
    def kv_bytes_per_block(self) -> int:
        return self.layout.bytes_per_block

    @property
    def num_blocks(self) -> int:
        """KV blocks the cache holds now."""
        return self.storage.num_blocks

    @property
    def capacity_blocks(self) -> int:
        """KV blocks the cache may grow to."""
        return self.storage.capacity_blocks

    def _blocks_in(self, num_bytes: float) -> int:
        return int(max(num_bytes, 0)) // self.kv_bytes_per_block

    def _make_storage(self) -> KVCacheStorage:
        """Resident: every block allocated now (vLLM's way). On demand: the floor (one max_model_len sequence) now,
        more while requests need it, given back when idle, up to the cap."""
        config, layout, device = self.config, self.layout, self.device
        resident = config.kv_cache_resident is not False
        if config.num_kvcache_blocks > 0:
            return FixedKVStorage(layout, config.num_kvcache_blocks, device)
        if config.kv_cache_memory_gib is not None:
            cap = self._blocks_in(config.kv_cache_memory_gib * GIB)
        elif device.type != "cuda":
            cap = self._blocks_in(config.cpu_kvcache_space_gib * GIB)
        else:
            cap = None
        if device.type != "cuda":
            cap = max(cap, 1)
            if resident:
                return FixedKVStorage(layout, cap, device)
            return ReallocKVStorage(layout, self.max_blocks_per_seq, cap, device)
        forward_peak, sampling_peak, used_now, total = self._profile_gpu_memory()
        activation_peak = max(forward_peak, sampling_peak) + self._prefill_graph_pool_estimate(forward_peak)
        if resident or not (config.enforce_eager or virtual_memory_available(device)):
            if not resident:
                logger.warning("CUDA virtual memory management is unavailable: the KV cache is allocated up front")
            num_blocks = self._blocks_in(total * config.gpu_memory_utilization - used_now - activation_peak)
            num_blocks = min(num_blocks, cap) if cap is not None else num_blocks
            if self.group is not None:
                num_blocks = self.group.min(num_blocks)  # every rank holds the same blocks: the smallest wins
            self._check_fits(num_blocks, num_blocks * self.kv_bytes_per_block)
            return FixedKVStorage(layout, num_blocks, device)
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        if cap is None:
            cap = self._blocks_in(total * config.gpu_memory_utilization - weights - activation_peak)
        self._check_fits(cap, cap * self.kv_bytes_per_block)
        self._growth_budget = growth_budget(device, config.gpu_memory_utilization, activation_peak)
        torch.cuda.empty_cache()  # the warm-up's activations go back to the driver too
        storage_type = ReallocKVStorage if config.enforce_eager and not virtual_memory_available(device) else VirtualKVStorage
        return storage_type(layout, self.max_blocks_per_seq, cap, device)

    def _prefill_graph_pool_estimate(self, forward_peak: int) -> int:
        """Bytes the prefill graphs' pool will keep once captured (after the cache is sized, so they are set aside
        here): the warm-up prefill's activation peak scaled to the largest graph's tokens, activations growing with
        them."""
        config = self.config
        graph_tokens = min(config.max_prefill_graph_tokens, config.max_num_batched_tokens)
        if config.enforce_eager or self.attention_backend != "triton" or not graph_tokens:
            return 0
        num_seqs, seq_len = self._warm_up_shape()
        return forward_peak * min(graph_tokens, num_seqs * seq_len) // (num_seqs * seq_len)

    def _warm_up_shape(self) -> tuple[int, int]:
        """(sequences, tokens each) of the warm-up prefill: max_model_len tokens each, as many as the budget takes."""
        config = self.config
        return max(1, min(config.max_num_batched_tokens // config.max_model_len, config.max_num_seqs)), config.max_model_len

    def _check_fits(self, num_blocks: int, num_bytes: int) -> None:
        if num_blocks < self.max_blocks_per_seq:
            config = self.config
            raise ValueError(
                f"not enough GPU memory for the KV cache of one max_model_len={config.max_model_len} sequence: "
                f"{max(num_bytes, 0) / GIB:.2f} GiB available at gpu_memory_utilization={config.gpu_memory_utilization} "
                f"holds {max(num_blocks, 0)} blocks, {self.max_blocks_per_seq} are needed; raise "
                "gpu_memory_utilization or kv_cache_memory_gib, or lower max_model_len"
            )

    def _profile_gpu_memory(self) -> tuple[int, int, int, int]:
        """(peak activation bytes of the warm-up prefill at the largest batch, of the warm-up sampling, bytes in use
        now, device bytes). The two are measured apart: a step samples after its forward's activations are gone, and
        only the forward's grow with the prefill graphs' pool. The bytes in use are read with the warm-ups' cached
        blocks still reserved, so the largest peak is set aside twice, on purpose: at run time the main pool, the
        decode and prefill graphs' private pools and the allocator's fragmentation each hold activations. Read after
        handing those blocks back (3.7 GiB more cache for the 0.6B architecture), a W1-like run with max_num_seqs=256
        held 3.3 GiB more than its budget (H200, 2026-11-29)."""
        gc.collect()  # engines dropped by the caller (model <-> engine reference cycles) give their memory back first
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        peaks = []
        for part in (self._warm_up_prefill, self._warm_up_samplers):
            torch.cuda.reset_peak_memory_stats(self.device)
            part()
            stats = torch.cuda.memory_stats(self.device)
            peaks.append(stats["allocated_bytes.all.peak"] - stats["allocated_bytes.all.current"])
        free, total = torch.cuda.mem_get_info(self.device)
        return peaks[0], peaks[1], total - free, total

    def _agreed_variant_layers(self) -> list[int]:
        """The model's ``variant_layers``, the same on every rank: the compile passes and the warm-ups before graph
        captures run only these, and they run collectives layer by layer (ranks whose weights differ in alignment
        could choose apart, and would wait on each other for ever). Each rank's choice counts."""
        chosen = self.model.variant_layers()
        if self.group is None:
            return chosen
        votes = torch.zeros(self.model.num_layers, dtype=torch.int64, device=self.device)
        votes[chosen] = 1
        self.group.all_reduce(votes)
        return torch.nonzero(votes).flatten().tolist()

    @torch.inference_mode()
    def _compile_kernels_ahead(self) -> None:
        """Compile at once, on a thread pool, the Triton kernels that the warm-up and the decode graphs launch
        (``hf_minivllm.kernels.launch``): one after another they took 7.5 of a 13 s start with an empty Triton
        cache (0.6B architecture, H200). In these passes the Triton kernels only compile and what they would write
        is never read; everything else (matrix products, collectives, sampling) runs, on scratch buffers. Nothing in
        them draws from torch's generators (see ``_warm_up_samplers``), so the caller's random numbers are left alone
        without saving and restoring the process-wide state, which would replay other threads' draws.

        The passes run only the variant layers (two or three layers, not all) and nothing waits between them, so
        that every variant is submitted within a fraction of a second and the block lasts about as long as the
        slowest compile. The slow ones go first: the warm-up's prefill kernel, then the cascade kernel. With a warm
        Triton cache the passes cost tens of milliseconds, so they always run, on every rank alike."""
        buckets = batch_buckets(self.config.max_num_seqs)
        with compile_ahead(), self.model.only_layers(self.variant_layers):
            self._warm_up()
            if self._cascade:
                # Few sequences split the prefix finely and many coarsely: both merge widths of the decode kernel.
                self._decode_compile_passes(sorted({CASCADE_MIN_SEQS, buckets[-1]}), cascade=True)
            self._decode_compile_passes(buckets[::-1])
        self._synchronize()

    def _decode_compile_passes(self, buckets: list[int], cascade: bool = False) -> None:
        """One decode pass per graph bucket given, with the graphs' shapes (separate input buffers, block tables as
        wide as the graphs'), whose split counts pick the decode kernel's variants; on a one-block scratch cache.
        With ``cascade``, through the cascade's kernels."""
        self._bind_kv_cache(torch.empty(self.layout.shape(1), device=self.device, dtype=self.layout.dtype))
        try:
            for bucket in buckets:
                set_attention_metadata(AttentionMetadata(
                    is_prefill=False,
                    slot_mapping=torch.full((bucket,), -1, dtype=torch.int64, device=self.device),
                    block_tables=torch.zeros(bucket, self.max_blocks_per_seq, dtype=torch.int32, device=self.device),
                    context_lens=torch.ones(bucket, dtype=torch.int32, device=self.device),
                    shared_prefix_len=torch.zeros(1, dtype=torch.int32, device=self.device) if cascade else None,
                ))
                try:
                    token_ids = torch.zeros(bucket, dtype=torch.int64, device=self.device)
                    positions = torch.zeros(bucket, dtype=torch.int64, device=self.device)
                    self.model.compute_logits(self.model(token_ids, positions))
                finally:
                    set_attention_metadata(None)
        finally:
            self._bind_kv_cache(None)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _warm_up(self) -> None:
        """The warm-up prefill, then the warm-up sampling. Besides measuring peak activations, this compiles the
        Triton kernels a prefill and sampling need."""
        self._warm_up_prefill()
        self._warm_up_samplers()

    def _warm_up_prefill(self) -> None:
        """A prefill of max_num_batched_tokens tokens on a scratch cache."""
        num_seqs, seq_len = self._warm_up_shape()
        self._bind_kv_cache(torch.empty(self.layout.shape(self.max_blocks_per_seq), device=self.device,
                                        dtype=self.layout.dtype))
        table = list(range(self.max_blocks_per_seq))
        seqs = []
        for _ in range(num_seqs):
            seq = Sequence([0] * seq_len, _WARMUP_PARAMS, self.block_size)
            seq.block_table = table
            seqs.append(seq)
        batch = ScheduledBatch(seqs, True, [seq_len] * num_seqs, [True] * num_seqs)
        self.run_plan(self._plan(batch, None), None)
        self._bind_kv_cache(None)
        self._synchronize()

    def _warm_up_samplers(self) -> None:
        """Each sampling path over max_num_seqs rows of logits in the model's dtype, as steps give them. The sort of
        the whole vocabulary (top-p and min-p without a top-k) takes the most memory; a logprobs request's copy of
        the logits is kept beside it, then its log-probabilities are computed, as ``_sample`` does. The one-pass
        kernel (temperatures alone) is compiled here rather than at the first step. The draws come from the
        runner's generator under a fixed seed, not from torch's: building an engine leaves the caller's random
        numbers alone."""
        config = self.config
        logits = torch.zeros(config.max_num_seqs, self.model.vocab_size, device=self.device, dtype=self.dtype)
        raw = [logits[chunk].clone() for chunk in row_chunks(*logits.shape)]
        for params in (_WARMUP_WHOLE_VOCABULARY, _WARMUP_PARAMS, _WARMUP_TEMPERATURE_ONLY):
            rows = [Sequence([0], params, self.block_size) for _ in range(config.max_num_seqs)]
            sample(logits, self._sampling_tensors(rows, draws=self._draws.manual_seed(0)))
        # Token 0 for every row, not the sampled ones: under compile_ahead() the kernel only compiles, and its
        # tokens are whatever its output buffer held.
        tokens = torch.zeros(config.max_num_seqs, dtype=torch.int64, device=self.device)
        TokenLogprobs.compute(raw, tokens, [min(MAX_LOGPROBS, self.model.vocab_size)] * config.max_num_seqs,
                              list(range(config.max_num_seqs)))
        del raw
        self._synchronize()

    @torch.inference_mode()
    def _calibrate_kv_scales(self) -> None:
        """FP8 cache: every layer's key and value scales from the largest magnitudes that a prefill over
        ``KV_CALIBRATION_TOKENS`` random tokens produces, with ``KV_SCALE_HEADROOM`` (larger values saturate). The
        pass runs before any cache exists, each layer attending over the pass's own keys and values with the torch
        backend (no kernel compiled only for it); its tokens are seeded, so every tensor-parallel rank runs the same
        pass. The other kernels it launches are the warm-up prefill's, compiled by then."""
        config, layers = self.config, self.model.attention_layers
        seq_len = min(config.max_model_len, KV_CALIBRATION_TOKENS)
        num_seqs = -(-KV_CALIBRATION_TOKENS // seq_len)  # as many tokens however short max_model_len is
        tokens = torch.randint(0, self.model.vocab_size, (num_seqs, seq_len), device="cpu",
                               generator=torch.Generator().manual_seed(0))
        seqs = [Sequence(row, _WARMUP_PARAMS, self.block_size) for row in tokens.tolist()]
        for seq in seqs:
            seq.block_table = list(range(-(-seq_len // self.block_size)))
        backends = [layer.backend for layer in layers]
        self._bind_kv_cache(None)
        for layer in layers:
            layer.backend, layer.kv_scales = "torch", None
            layer.kv_amax = torch.zeros(2, dtype=torch.float32, device=self.device)
        try:
            self.run_plan(self._plan(ScheduledBatch(seqs, True, [seq_len] * num_seqs, [False] * num_seqs), None), None)
            for layer in layers:
                layer.kv_scales = (layer.kv_amax * (KV_SCALE_HEADROOM / FP8_MAX)).clamp_(min=torch.finfo(torch.float32).tiny)
        finally:
            for layer, backend in zip(layers, backends):
                layer.backend, layer.kv_amax = backend, None

    def _bind_kv_cache(self, cache: torch.Tensor | None) -> None:
        """Point every attention layer at its key and value slabs of ``cache`` (None: no cache)."""
        self.kv_cache = cache
        for index, layer in enumerate(self.model.attention_layers):
            if cache is None:
                layer.k_cache = layer.v_cache = torch.empty(0, device=self.device, dtype=self.dtype)
            else:
                layer.k_cache, layer.v_cache = cache[0, index], cache[1, index]

    def grow_kv_cache(self, min_blocks: int, wanted_blocks: int) -> int:
        """Give the cache at least ``min_blocks`` blocks (``wanted_blocks`` if memory allows); returns its size now."""
        storage = self.storage
        if storage.capacity_blocks <= storage.num_blocks:
            return storage.num_blocks
        if self._growth_budget is None:
            budget = (storage.capacity_blocks - storage.num_blocks) * self.kv_bytes_per_block
        else:
            needed = (min_blocks - storage.num_blocks) * self.kv_bytes_per_block
            if needed > torch.cuda.mem_get_info(self.device)[0]:
                torch.cuda.empty_cache()  # blocks PyTorch caches unused (e.g. a training step's) go to the driver
            budget = self._growth_budget()
        tensor = storage.tensor
        num_blocks = storage.grow(min_blocks, wanted_blocks, budget)
        if storage.tensor is not tensor:
            self._bind_kv_cache(storage.tensor)
        return num_blocks

    def shrink_kv_cache(self) -> int:
        """Hand the cache's memory above its floor back (nothing may be running); returns its size now."""
        tensor = self.storage.tensor
        num_blocks = self.storage.shrink()
        if self.storage.tensor is not tensor:
            self._bind_kv_cache(self.storage.tensor)
        return num_blocks

    def close(self) -> None:
        """Release the CUDA graphs and the KV cache (after the device finished any step still writing to it); with
        tensor parallelism, the other ranks' runners too. This rank's own are released even when a dead worker is
        first noticed here (its error still goes on): the communicator's abort that follows waits for these graphs."""
        try:
            if self.device.type == "cuda":
                if self.workers is not None and not self.workers.closed:
                    done = torch.cuda.Event()
                    done.record()
                    self.workers.wait(done)
                if self.workers is None or not self.workers.closed:  # failed workers may leave collectives waiting
                    torch.cuda.synchronize(self.device)
            if self.workers is not None and not self.workers.closed:
                self.workers.close_runner()
        finally:
            for graphs in (self.graphs, self.prefill_graphs):
                if graphs is not None:
                    graphs.release()
            self.graphs = self.prefill_graphs = None
            self._bind_kv_cache(None)
            self.storage.close()

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        tensor = torch.tensor(values, dtype=dtype, device="cpu", pin_memory=self.device.type == "cuda")
        return tensor.to(self.device, non_blocking=True)

    def _pinned(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        return tensor.pin_memory() if self.device.type == "cuda" else tensor

    def _block_table_array(self, seqs: list[Sequence]) -> np.ndarray:
        table = np.zeros((len(seqs), max(len(seq.block_table) for seq in seqs)), dtype=np.int32)
        for row, seq in enumerate(seqs):
            table[row, : len(seq.block_table)] = seq.block_table
        return table

    def _array_to_device(self, array: np.ndarray) -> torch.Tensor:
        return self._pinned(array).to(self.device, non_blocking=True)

    def _rope_positions(self, positions: np.ndarray, seqs: list[Sequence], rows: np.ndarray | None = None) -> np.ndarray:
        """The rotary cache rows of tokens at ``positions`` (of ``seqs[rows]``): the positions themselves, except for
        LongRoPE sequences rotated with the long table (``Sequence.long_rope``), whose rows follow the short
        table's."""
        if self._rope_long_after is None:
            return positions
        long_rope = np.fromiter((seq.long_rope for seq in seqs), dtype=np.int64, count=len(seqs))
        return positions + (long_rope if rows is None else long_rope[rows]) * self._rope_long_offset

    def _plan_prefill(self, batch: ScheduledBatch, previous: LaunchedStep | None) -> PrefillPlan:
        """Prefill inputs, built per token with numpy (a chunk is up to max_num_batched_tokens tokens).

        In a mixed step, running sequences take part with their one decode token; one whose token the step in
        flight (``previous``) sampled gets it on the device, like a decode step's pending input."""
        seqs = batch.seqs
        block_size = self.block_size
        counts = np.asarray(batch.num_new_tokens, dtype=np.int64)
        starts = np.fromiter((seq.num_computed_tokens for seq in seqs), dtype=np.int64, count=len(seqs))
        cu_q = np.zeros(len(seqs) + 1, dtype=np.int32)
        cu_k = np.zeros(len(seqs) + 1, dtype=np.int32)
        np.cumsum(counts, out=cu_q[1:])
        np.cumsum(starts + counts, out=cu_k[1:])
        token_rows = np.repeat(np.arange(len(seqs)), counts)
        positions = np.arange(cu_q[-1], dtype=np.int64) - cu_q[:-1][token_rows] + starts[token_rows]
        tables = self._block_table_array(seqs)
        slots = tables[token_rows, positions // block_size].astype(np.int64) * block_size + positions % block_size
        input_ids = np.zeros(len(positions), dtype=np.int64)
        pending_offsets, pending_rows = [], []
        for seq, start, count, offset in zip(seqs, starts.tolist(), counts.tolist(), cu_q.tolist()):
            known = seq.token_ids[start : start + count]
            input_ids[offset : offset + len(known)] = known
            if len(known) < count:  # the decode token of a sequence whose last token is still on the device
                pending_offsets.append(offset + len(known))
                pending_rows.append(previous.row_of_sequence()[seq.seq_id])
        return PrefillPlan(
            input_ids=input_ids, positions=self._rope_positions(positions, seqs, token_rows), slot_mapping=slots,
            block_tables=tables,
            cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=int(counts.max()),
            max_seqlen_k=int((starts + counts).max()),
            logits_rows=(cu_q[1:] - 1)[np.asarray(batch.sample, dtype=bool)].astype(np.int64),
            pending_offsets=np.asarray(pending_offsets, dtype=np.int64) if pending_offsets else None,
            pending_rows=np.asarray(pending_rows, dtype=np.int64) if pending_offsets else None,
        )

    def _plan_decode(self, batch: ScheduledBatch, previous: LaunchedStep | None) -> DecodePlan:
        """Decode inputs: one row per sequence (copied to the device, or into the graph's buffers, in one go).

        A sequence with a pending token (sampled by ``previous``, still on the device) computes at position
        ``num_tokens - 1`` all the same; its input id is taken from ``previous``'s tokens on the device.
        """
        block_size = self.block_size
        seqs = batch.seqs
        tables = self._decode_tables.gather(seqs)
        rows = np.empty((3, len(seqs)), dtype=np.int64)
        rows[0] = [seq.last_token for seq in seqs]
        positions = rows[1]
        positions[:] = [seq.num_tokens - 1 for seq in seqs]
        rows[2] = tables[np.arange(len(seqs)), positions // block_size] * block_size + positions % block_size
        plan = DecodePlan(rows, (positions + 1).astype(np.int32), tables)
        if self._cascade and len(seqs) >= CASCADE_MIN_SEQS:
            shared = shared_prefix_blocks(tables, plan.context_lens, block_size) * block_size
            if shared >= CASCADE_MIN_PREFIX_TOKENS:
                plan.shared_prefix_len = shared
        if self._rope_long_after is not None:  # after the slots and lengths, which take the plain positions
            rows[1] = self._rope_positions(positions.copy(), seqs)
        if any(seq.num_pending_tokens for seq in seqs):
            row_of = previous.row_of_sequence()
            plan.previous_rows = np.asarray([row_of[seq.seq_id] if seq.num_pending_tokens else -1 for seq in seqs],
                                            dtype=np.int64)
        return plan

    def _sampling_tensors(self, seqs: list[Sequence], draws: torch.Generator | None = None) -> SamplingTensors:
        """The step's per-row settings; unseeded sampled rows draw from ``draws``, by default the runner's generator
        reseeded for the step (``_reseeded_draws``)."""
        if all(seq.sampling_params.greedy for seq in seqs):
            return GREEDY
        vocab = self.model.vocab_size
        temperatures, top_ks, top_ps, min_ps = [], [], [], []
        generators = {}
        for row, seq in enumerate(seqs):
            params = seq.sampling_params
            temperatures.append(0.0 if params.greedy else float(params.temperature))
            top_ks.append(params.top_k if params.top_k > 0 else vocab)
            top_ps.append(float(params.top_p))
            min_ps.append(float(params.min_p))
            if params.seed is not None and not params.greedy:
                generators[row] = self._generator(seq)
        any_greedy = min(temperatures) == 0
        # Only sampled rows' filters count: a greedy row's top_k (HF's generation config gives one) must not take the
        # others off the one-pass kernel or the top-k candidates.
        sampled = [row for row, temperature in enumerate(temperatures) if temperature > 0]
        return SamplingTensors(
            temperatures=self._to_device(temperatures, torch.float32),
            top_ks=self._to_device(top_ks, torch.int64),
            top_ps=self._to_device(top_ps, torch.float32),
            min_ps=self._to_device(min_ps, torch.float32),
            all_greedy=max(temperatures) == 0,
            any_greedy=any_greedy,
            use_top_k=min(top_ks[row] for row in sampled) < vocab,
            use_top_p=min(top_ps[row] for row in sampled) < 1.0,
            use_min_p=max(min_ps[row] for row in sampled) > 0.0,
            generators=generators,
            max_top_k=max(top_ks[row] for row in sampled),
            generator=draws if draws is not None else self._reseeded_draws(),
        )

    def _reseeded_draws(self) -> torch.Generator:
        """The runner's generator, seeded for this step from torch's default CPU generator, so that
        ``torch.manual_seed`` keeps making runs repeatable. Not torch's CUDA default generator: up to at least torch
        2.11 every CUDA graph capture in the process puts that one in capture mode, and an eager draw from it in any
        other thread meanwhile raises ("Offset increment outside graph capture encountered unexpectedly"). Another
        engine starting, a cascade graph captured mid-run or a user's own graphs would fail this engine's steps."""
        self._draws.manual_seed(int(torch.randint(1 << 62, (), device="cpu")))
        return self._draws

    def _generator(self, seq: Sequence) -> torch.Generator:
        if seq.generator is None:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(seq.sampling_params.seed)
        return seq.generator

    def _suppress_stop_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """min_tokens: eos and stop tokens get -inf until a request has generated that many tokens.

        Rows are grouped by their banned ids (usually one group: one generate call's requests share their settings);
        a group's ids live on the device once, and a group covering the whole batch needs no row index at all.
        """
        groups: dict[tuple[int, ...], list[int]] = {}
        for row, seq in enumerate(seqs):
            params = seq.sampling_params
            if seq.num_completion_tokens + seq.num_pending_tokens < params.min_tokens:
                eos = () if params.ignore_eos else self.eos_token_ids
                banned = tuple(sorted({*params.stop_token_ids, *eos}))
                groups.setdefault(banned, []).append(row)
        for banned, rows in groups.items():
            if not banned:
                continue
            columns = self._banned_columns.get(banned)
            if columns is None:
                columns = self._banned_columns[banned] = torch.tensor(banned, dtype=torch.int64, device=self.device)
            # index_fill_/index_copy_, not advanced-index assignment: index_put_ syncs with the device.
            if len(rows) == len(seqs):
                logits.index_fill_(1, columns, float("-inf"))
            else:
                row_index = self._to_device(rows, torch.int64)
                logits.index_copy_(0, row_index, logits.index_select(0, row_index).index_fill_(1, columns, float("-inf")))

    def _plan(self, batch: ScheduledBatch, previous: LaunchedStep | None) -> StepPlan:
        """The step's inputs on the host. A mixed step whose decode rows fit a CUDA graph runs in two passes: the
        running sequences' decode tokens through the graph, the prompts eagerly (then costing only their own
        launches); one sampling over both."""
        decode = prefill = None
        if batch.is_prefill and self._splits(batch):
            decode = self._plan_decode(batch.part(0, batch.num_decode, is_prefill=False), previous)
            prefill_batch = batch.part(batch.num_decode, None, is_prefill=True)
            self._decode_tables.forget(prefill_batch.seqs)  # admitted or recomputed sequences may hold new tables
            prefill = self._plan_prefill(prefill_batch, previous)
        elif batch.is_prefill:
            self._decode_tables.clear()  # admitted or recomputed sequences may hold new block tables
            prefill = self._plan_prefill(batch, previous)
        else:
            decode = self._plan_decode(batch, previous)
        return StepPlan(decode, prefill, sum(batch.sample))

    @torch.inference_mode()
    def run_plan(self, plan: StepPlan, previous_tokens: torch.Tensor | None) -> torch.Tensor | None:
        """Queue the step's forward pass; the logits of its sampled rows (None when no row samples).
        ``previous_tokens``: the sampled tokens of the step in flight, which pending inputs index into."""
        logits = self._decode_logits(plan.decode, previous_tokens) if plan.decode is not None else None
        if plan.prefill is not None:
            prefill_logits = self._prefill_logits(plan.prefill, previous_tokens)
            if logits is None or prefill_logits is None:
                logits = prefill_logits if logits is None else logits
            else:
                logits = torch.cat([logits, prefill_logits])
        return logits

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, previous: LaunchedStep | None = None) -> LaunchedStep:
        """Queue one step on the device and return without waiting for it (sampling included).

        ``previous`` is the step still in flight whose sampled tokens are the pending inputs of this step's decode
        rows (a decode step, or the running sequences of a mixed step).
        """
        plan = self._plan(batch, previous)
        previous_tokens = previous.tokens if previous is not None else None
        if self.workers is None:
            return self._sample(batch, self.run_plan(plan, previous_tokens))
        self.workers.step(plan)
        try:
            launched = self._sample(batch, self.run_plan(plan, previous_tokens))
            if launched.tokens is not None:
                self.group.broadcast(launched.tokens)  # the other ranks' next pending inputs
        except BaseException as error:
            self.workers.check(error)  # a worker's failure, with its cause, rather than a broken collective
            # Rank 0 failed alone after the workers took the step: they wait in its collectives, out of step.
            self.workers.fail(f"rank 0 failed in the middle of a step ({error!r})")
            raise
        launched.wait = self.workers.wait
        return launched

    def _sample(self, batch: ScheduledBatch, logits: torch.Tensor | None) -> LaunchedStep:
        """Sample the sampled rows' next tokens (step hooks, min_tokens, logprobs) behind the forward pass."""
        if logits is None:
            return LaunchedStep(batch, None)
        sampled_seqs = [seq for seq, sampled in zip(batch.seqs, batch.sample) if sampled]
        logprob_rows = ([row for row, seq in enumerate(sampled_seqs) if seq.sampling_params.logprobs is not None]
                        if batch.has_logprobs else [])
        # Before hooks, suppression and filters; in the logits' dtype, a chunk of rows at a time (see row_chunks).
        raw = [logits[logprob_rows[chunk]] for chunk in row_chunks(len(logprob_rows), logits.shape[-1])]
        failures = []
        if batch.has_step_hooks:
            logits = logits.float()  # HF processors score in float32
            failures = apply_step_hooks(logits, sampled_seqs)
        self._suppress_stop_tokens(logits, sampled_seqs)
        params = self._sampling_tensors(sampled_seqs)
        tokens = sample(logits, params)
        # A row with no distribution comes back NO_DISTRIBUTION for the host, which fails its request; the next step,
        # queued before the host knows, reads a valid token id in its place.
        fed_tokens = tokens if params.all_greedy else tokens.clamp_min(0)
        logprobs = None
        if raw:
            logprobs = TokenLogprobs.compute(raw, fed_tokens[self._to_device(logprob_rows, torch.int64)],
                                             [sampled_seqs[row].sampling_params.logprobs for row in logprob_rows],
                                             [sampled_seqs[row].seq_id for row in logprob_rows])
        return LaunchedStep(batch, fed_tokens, failures, logprobs, host_tokens=tokens)


    def _splits(self, batch: ScheduledBatch) -> bool:
        """Whether a mixed step runs its decode rows through a decode graph (CUDA graphs captured for that many)."""
        return batch.num_decode > 0 and self.graphs is not None and self.graphs.can_run(batch.num_decode)

    def _prefill_logits(self, plan: PrefillPlan, previous_tokens: torch.Tensor | None) -> torch.Tensor | None:
        """Logits of the sampled rows of a prefill (or combined mixed) pass, None when no row samples: through a
        prefill graph when one fits."""
        if self.prefill_graphs is not None and self.prefill_graphs.can_run(plan):
            return self.prefill_graphs.run(plan, previous_tokens)
        input_ids = self._array_to_device(plan.input_ids)
        if plan.pending_offsets is not None:
            input_ids.index_copy_(0, self._array_to_device(plan.pending_offsets),
                                  previous_tokens[self._array_to_device(plan.pending_rows)])
        set_attention_metadata(AttentionMetadata(
            is_prefill=True,
            slot_mapping=self._array_to_device(plan.slot_mapping),
            block_tables=self._array_to_device(plan.block_tables),
            cu_seqlens_q=self._array_to_device(plan.cu_seqlens_q),
            cu_seqlens_k=self._array_to_device(plan.cu_seqlens_k),
            max_seqlen_q=plan.max_seqlen_q,
            max_seqlen_k=plan.max_seqlen_k,
        ))
        try:
            hidden = self.model(input_ids, self._array_to_device(plan.positions))
        finally:
            set_attention_metadata(None)
        if not len(plan.logits_rows):
            return None
        return self.model.compute_logits(hidden[self._array_to_device(plan.logits_rows)])

    def _decode_logits(self, plan: DecodePlan, previous_tokens: torch.Tensor | None) -> torch.Tensor:
        """Logits of a decode pass: through the CUDA graph of its size when there is one."""
        inputs = DecodeInputs(self._pinned(plan.rows), self._pinned(plan.context_lens), self._pinned(plan.block_tables))
        if plan.previous_rows is not None:
            inputs.previous_rows = self._pinned(plan.previous_rows)
            inputs.previous_tokens = previous_tokens
        if self.graphs is not None and self.graphs.can_run(plan.rows.shape[1]):
            return self.graphs.run(inputs, plan.shared_prefix_len)
        return self.eager_decode_logits(inputs, plan.shared_prefix_len)

    def eager_decode_logits(self, inputs: DecodeInputs, shared_prefix_len: int = 0) -> torch.Tensor:
        """The decode forward without a graph (CPU, more sequences than the largest graph, or a cascade)."""
        rows = inputs.rows.to(self.device, non_blocking=True)
        inputs.fill_pending_input_ids(rows[0])
        set_attention_metadata(AttentionMetadata(
            is_prefill=False,
            slot_mapping=rows[2],
            block_tables=inputs.block_tables.to(self.device, non_blocking=True),
            context_lens=inputs.context_lens.to(self.device, non_blocking=True),
            shared_prefix_len=(self._to_device([shared_prefix_len], torch.int32) if shared_prefix_len else None),
        ))
        try:
            return self.model.compute_logits(self.model(rows[0], rows[1]))
        finally:
            set_attention_metadata(None)


class TokenLogprobs:
    """Log-probabilities of one step's sampled tokens (and the most likely alternatives) for the requests that ask,
    copied to the host behind the step."""

    def __init__(self, seq_ids: list[int], counts: list[int], chosen: torch.Tensor, top_values: torch.Tensor,
                 top_ids: torch.Tensor):
        self.seq_ids = seq_ids
        self.counts = counts
        self.chosen, self.top_values, self.top_ids = (t.to("cpu", non_blocking=True) for t in (chosen, top_values, top_ids))

    @classmethod
    def compute(cls, raw_chunks: list[torch.Tensor], tokens: torch.Tensor, counts: list[int],
                seq_ids: list[int]) -> TokenLogprobs:
        """From the rows' raw logits in chunks of rows (``row_chunks``), their float32 log-softmax a chunk at a
        time; ``tokens`` holds every row's sampled token, ``counts`` how many alternatives each row asked for."""
        top = max(counts)
        chosen, top_values, top_ids = [], [], []
        start = 0
        for raw in raw_chunks:
            logprobs = torch.log_softmax(raw.float(), dim=-1)
            chunk_tokens = tokens[start:start + len(raw), None]
            start += len(raw)
            chosen.append(logprobs.gather(1, chunk_tokens).squeeze(1))
            values, ids = logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], chunk_tokens[:, :0])
            top_values.append(values)
            top_ids.append(ids)
        return cls(seq_ids, counts, torch.cat(chosen), torch.cat(top_values), torch.cat(top_ids))

    def by_sequence(self) -> dict[int, tuple[float, dict[int, float]]]:
        """seq_id -> (the sampled token's log-probability, {alternative token id: log-probability}), each row's own
        number of alternatives (the step computed the most any row asked for); call once the step's tokens were
        read back (the copies are then done)."""
        chosen, values, ids = self.chosen.tolist(), self.top_values.tolist(), self.top_ids.tolist()
        return {seq_id: (lp, dict(zip(row_ids[:count], row_values[:count])))
                for seq_id, count, lp, row_values, row_ids in zip(self.seq_ids, self.counts, chosen, values, ids)}


class LaunchedStep:
    """A step queued on the device; its sampled tokens are copied to pinned host memory behind it."""

    def __init__(self, batch: ScheduledBatch, tokens: torch.Tensor | None,
                 hook_failures: list[tuple[list[Sequence], BaseException]] | None = None,
                 logprobs: TokenLogprobs | None = None, host_tokens: torch.Tensor | None = None):
        self.batch = batch
        self.tokens = tokens  # [number of sampled sequences] int64, on the device: the next step's pending inputs
        self.hook_failures = hook_failures or []  # (requests, exception) of step hooks that raised
        self.logprobs = logprobs
        # What the host reads: ``tokens``, or (``host_tokens``) the same with NO_DISTRIBUTION where a row had none.
        read = tokens if host_tokens is None else host_tokens
        self._host_tokens = read
        self._copied: torch.cuda.Event | None = None
        self.wait: Callable[[torch.cuda.Event], None] = torch.cuda.Event.synchronize  # (TP: watching the workers)
        if read is not None and read.is_cuda:
            self._host_tokens = torch.empty(read.shape, dtype=read.dtype, device="cpu", pin_memory=True)
            self._host_tokens.copy_(read, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()

    def row_of_sequence(self) -> dict[int, int]:
        """seq_id -> row in ``tokens`` of each sampled sequence (a prefill chunk that ends mid-prompt samples none)."""
        sampled = (seq for seq, sample in zip(self.batch.seqs, self.batch.sample) if sample)
        return {seq.seq_id: row for row, seq in enumerate(sampled)}

    def token_ids(self) -> list[int | None]:
        """Wait for the step; the new token of each sampled sequence, None for prefill chunks."""
        if self.tokens is None:
            return [None] * len(self.batch.seqs)
        if self._copied is not None:
            self.wait(self._copied)
        tokens = iter(self._host_tokens.tolist())
        return [next(tokens) if sampled else None for sampled in self.batch.sample]


# Warm-up rows use every sampling filter; without a top-k, the sampler sorts the whole vocabulary (its largest
# footprint, which the memory profile must see).
_WARMUP_PARAMS = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.05)
_WARMUP_WHOLE_VOCABULARY = SamplingParams(temperature=1.0, top_p=0.9, min_p=0.05)
_WARMUP_TEMPERATURE_ONLY = SamplingParams(temperature=1.0)
