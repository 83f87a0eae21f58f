"""Per-request latency figures and the server's Prometheus metrics (text format 0.0.4, no client library needed).

Names follow vLLM's where they mean the same thing, under the ``hf_minivllm:`` prefix, so dashboards built for
vLLM need only the prefix changed.
"""
from __future__ import annotations

import bisect
import threading
from collections import Counter
from dataclasses import dataclass, field

# Bucket bounds (seconds) as vLLM uses them for the same histograms.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)


@dataclass
class RequestMetrics:
    """One finished request's timings (seconds, from its arrival) and token counts."""

    queue_time: float | None  # arrival to its first scheduled prefill
    time_to_first_token: float | None
    inter_token_latencies: list[float]  # gaps between a choice's successive tokens
    e2e_latency: float
    num_prompt_tokens: int
    num_generation_tokens: int
    finish_reasons: list[str | None]


class Histogram:
    """Cumulative-bucket histogram, as Prometheus exposes it."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip([*map(repr, self.buckets), "+Inf"], self.counts):
            running += count
            out.append(f'{name}_bucket{{{labels},le="{bound}"}} {running}')
        out.append(f"{name}_sum{{{labels}}} {self.sum!r}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


@dataclass
class ServingMetrics:
    """Counters and histograms over every request an ``AsyncLLM`` served; updated from any thread."""

    time_to_first_token: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    inter_token_latency: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e_latency: Histogram = field(default_factory=lambda: Histogram(REQUEST_BUCKETS))
    queue_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_BUCKETS))
    requests_started: int = 0
    requests_aborted: int = 0
    finished_reasons: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def request_started(self) -> None:
        with self._lock:
            self.requests_started += 1

    def request_aborted(self) -> None:
        with self._lock:
            self.requests_aborted += 1

    def request_finished(self, metrics: RequestMetrics) -> None:
        with self._lock:
            self.prompt_tokens += metrics.num_prompt_tokens
            self.generation_tokens += metrics.num_generation_tokens
            self.finished_reasons.update(reason or "abort" for reason in metrics.finish_reasons)
            if metrics.time_to_first_token is not None:
                self.time_to_first_token.observe(metrics.time_to_first_token)
            if metrics.queue_time is not None:
                self.queue_time.observe(metrics.queue_time)
            for gap in metrics.inter_token_latencies:
                self.inter_token_latency.observe(gap)
            self.e2e_latency.observe(metrics.e2e_latency)

    def render(self, model_name: str, gauges: dict[str, float]) -> str:
        """The Prometheus text exposition of everything, with the engine's ``gauges`` read at scrape time."""
        labels = f'model_name="{_escape(model_name)}"'
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            lines.extend([f"# HELP hf_minivllm:{name} {help_text}", f"# TYPE hf_minivllm:{name} {kind}"])
            lines.extend(f"hf_minivllm:{sample}" for sample in samples)

        gauge_help = {
            "num_requests_running": "Requests in the running batch.",
            "num_requests_waiting": "Requests waiting to be scheduled.",
            "kv_cache_usage_perc": "Fraction of KV cache blocks in use (1 = full).",
        }
        for name, help_text in gauge_help.items():
            metric(name, "gauge", help_text, [f"{name}{{{labels}}} {gauges[name]!r}"])
        with self._lock:
            counters = {
                "num_preemptions_total": ("Requests preempted (recomputed later).", gauges["num_preemptions"]),
                "prefix_cache_hit_tokens_total": ("Prompt tokens served from the prefix cache.",
                                                  gauges["prefix_cache_hit_tokens"]),
                "prompt_tokens_total": ("Prompt tokens of finished requests.", self.prompt_tokens),
                "generation_tokens_total": ("Generated tokens of finished requests.", self.generation_tokens),
                "num_requests_total": ("Requests received.", self.requests_started),
                "num_aborted_requests_total": ("Requests ended early (the client left).", self.requests_aborted),
            }
            for name, (help_text, value) in counters.items():
                metric(name, "counter", help_text, [f"{name}{{{labels}}} {value}"])
            metric("request_success_total", "counter", "Finished choices by finish reason.",
                   [f'request_success_total{{{labels},finished_reason="{reason}"}} {count}'
                    for reason, count in sorted(self.finished_reasons.items())])
            histograms = {
                "time_to_first_token_seconds": ("Time to first token.", self.time_to_first_token),
                "inter_token_latency_seconds": ("Time between successive tokens of a choice.",
                                                self.inter_token_latency),
                "e2e_request_latency_seconds": ("Arrival to last token.", self.e2e_latency),
                "request_queue_time_seconds": ("Arrival to first scheduled.", self.queue_time),
            }
            for name, (help_text, histogram) in histograms.items():
                metric(name, "histogram", help_text, histogram.lines(name, labels))
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
