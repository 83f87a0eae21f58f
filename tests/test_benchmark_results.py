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


def test_scripts_turn_their_summaries_into_figures_against_their_peers():
    """Each script's figures() on a summary shaped like its own output: the peer of the same run comes along."""
    import bf16_agreement
    import serving
    import w8

    agreement = bf16_agreement.figures({"weights": "trained", "agreement": {
        "hf_fp32 vs ours_triton": 0.99, "hf_bf16 vs hf_fp32": 0.98, "hf_bf16 vs ours_triton": 0.97,
        "hf_bf16 vs hf_bf16_eager": 0.96}})
    assert [(f.value, f.peer_value) for f in agreement] == [(0.99, 0.98), (0.97, 0.96)]

    rate = {"output_tok_s": 1000.0, "ttft_ms_p99": 50.0, "sustained": True}
    w6 = serving.figures({"servers": {
        "ours": {"rates": {"2.0": rate, "inf": {**rate, "output_tok_s": 9000.0}}, "stall": {"short": {
            "itl_p99_over_p50": 4.0}}},
        "ours_no_mixed": {"stall": {"short": {"itl_p99_over_p50": 8.0}}},
        "hf": {"rates": {"2.0": {**rate, "ttft_ms_p99": 250.0}, "inf": {**rate, "output_tok_s": 500.0}}}}})
    by_name = {(f.workload, f.figure): f for f in w6}
    assert by_name[("W6 (0.6b, Poisson, 2 req/s)", "TTFT p99")].ratio() == 5.0
    assert by_name[("W6 (0.6b, Poisson, all at once)", "output throughput")].ratio() == 18.0
    assert by_name[("W6 stall test (short streams beside 8,000-token prompts)", "ITL p99 / ITL p50")].ratio() == 2.0

    tp = {"batch1_ms_per_token": 10.0, "w1": {"requests": 128, "tok_s": 3000.0}}
    hf = {"gpus": 4, "batch1_ms_per_token": 300.0, "w1": {"requests": 128, "tok_s": 200.0, "seconds": 90}}
    w8_figures = w8.figures({"parts": {"tp2": tp, "tp4": tp, "hf_device_map": hf}})
    assert sorted(f.ratio() for f in w8_figures) == [15.0, 15.0, 30.0, 30.0]

    import real_programs

    programs = real_programs.figures({
        "W7_threads": {"threads": 64, "requests": 256, "tok_s": 8000.0, "hf_threads_tok_s": 400.0,
                       "llm_batch_tok_s": 16000.0},
        "short_calls": {"calls": 200, "ms_per_token": 2.0, "w2_ms_per_token": 1.5},
        "memory": {"weights_gib": 1.2, "after_accelerate_gib": 2.2, "resident_llm_idle_gib": 65.2}})
    assert [round(f.ratio(), 2) for f in programs] == [20.0, 0.5, 0.75, 64.0]

    import dropin_processors

    processors = dropin_processors.figures({"hf_subset": "32 prompts x 128 new tokens", "hf_tok_s": 100.0,
                                            "with_processor": {"tok_s": 15000.0},
                                            "without_processor": {"tok_s": 30000.0}})
    assert [f.ratio() for f in processors] == [150.0, 0.5]
