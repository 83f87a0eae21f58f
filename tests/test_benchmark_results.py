"""benchmarks/results.py: figures recorded per device, deduplicated, rendered as tables with ratios against the
peer of the same run (lower-is-better units inverted)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import results  # noqa: E402  (benchmarks/results.py)


def test_record_dedupes_and_tables_show_the_latest_figure_with_its_ratio(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MINIVLLM_RESULTS_DIR", str(tmp_path))
    latency = results.Figure("W2", "latency", "ms/token", 1.5, "ours", higher_is_better=False, peer="HF",
                             peer_value=3.0)
    throughput = results.Figure("W1", "output throughput", "tok/s", 20000.0, "ours", peer="HF", peer_value=500.0)
    assert results.record("NVIDIA H100 80GB HBM3", [latency, throughput], "bench_gpu", "abc1234", "2026-11-01") == 2
    assert results.record("NVIDIA H100 80GB HBM3", [latency], "bench_gpu", "abc1234", "2026-11-01") == 0
    newer = results.Figure("W2", "latency", "ms/token", 1.2, "ours", higher_is_better=False, peer="HF",
                           peer_value=3.0)
    assert results.record("NVIDIA H100 80GB HBM3", [newer], "bench_gpu", "def5678", "2026-11-02") == 1
    entries = json.loads((tmp_path / "nvidia-h100-80gb-hbm3.json").read_text())
    assert [e["ratio"] for e in entries] == [2.0, 40.0, 2.5]
    table = results._tables({"NVIDIA H100 80GB HBM3": entries})
    assert "| W2 | latency | ours | 1.20 ms/token | HF | 3.00 ms/token | 2.50x | def5678, 2026-11-02 |" in table
    assert "1.50 ms/token" not in table
    assert "| W1 | output throughput | ours | 20,000 tok/s | HF | 500 tok/s | 40.00x | abc1234, 2026-11-01 |" in table
