"""Counters that show what the engine did: users and tests read them through ``hf_minivllm.stats``."""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class EngineStats:
    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    preemptions: int = 0
    steps: int = 0
    fallbacks: int = 0
    fallback_reasons: Counter = field(default_factory=Counter)
    weight_updates: int = 0  # calls that found the model's weights changed
    rebuilds: int = 0  # of those, changes that needed a new decoder (new tensors, dtype or device)
    kv_cache_growths: int = 0  # times the on-demand KV cache took more memory
    kv_cache_growth_seconds: float = 0.0  # time those growths took (mapping memory)
    kv_cache_peak_blocks: int = 0  # the most KV blocks held at once

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record_fallback(self, reason: str) -> None:
        """Called from the calling threads (the engine loop writes the other counters)."""
        with self._lock:
            self.fallbacks += 1
            self.fallback_reasons[reason] += 1

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefix_cache_hit_tokens": self.prefix_cache_hit_tokens,
            "preemptions": self.preemptions,
            "steps": self.steps,
            "fallbacks": self.fallbacks,
            "fallback_reasons": dict(self.fallback_reasons),
            "weight_updates": self.weight_updates,
            "rebuilds": self.rebuilds,
            "kv_cache_growths": self.kv_cache_growths,
            "kv_cache_growth_seconds": self.kv_cache_growth_seconds,
            "kv_cache_peak_blocks": self.kv_cache_peak_blocks,
        }
