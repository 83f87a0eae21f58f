#!/usr/bin/env bash
# One call on the GPU machine: GPU tests, then the end-to-end benchmarks, logs and JSON under $OUT.
# Usage: bash benchmarks/run_device.sh [tests] [engine-tests] [profile] [host] [timeline] [tp TP_ARGS... | bench ARGS...]
# tests fits one device call (10 minutes); tests/test_gpu_engine.py (engine-tests) takes about 3.5 minutes on an
# H200 (ENGINE_TESTS_K, a pytest -k expression, picks some of its tests).
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
if [ "${1:-}" = "tests" ]; then
  shift
  # Test files whose optional extra the GPU machine lacks (ray, the server) are left out rather than failing to import.
  missing=()
  python3 -c "import ray" 2>/dev/null || missing+=(--ignore=tests/test_ray.py)
  python3 -c "import fastapi, uvicorn, openai" 2>/dev/null || missing+=(--ignore=tests/test_serve.py)
  # The kernel files whole (their tests run compiled here, interpreted on CPU), then every other gpu-marked test but
  # the engine's, both in parallel (pytest-xdist).
  kernel_files=(tests/test_kernels.py tests/test_gemv_kernel.py tests/test_sampling_kernel.py tests/test_rotary_kernel.py
                tests/test_attention_layer.py tests/test_fp8_kv_cache.py)
  others=(${missing[@]+"${missing[@]}"} --ignore=tests/test_gpu_engine.py)  # an empty array under set -u, old bash
  for file in "${kernel_files[@]}"; do others+=(--ignore="$file"); done
  { python3 -m pytest -q -p no:cacheprovider -n 8 "${kernel_files[@]}"
    python3 -m pytest -q -p no:cacheprovider -n 8 -m gpu tests/ "${others[@]}"; } 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [ "${1:-}" = "engine-tests" ]; then
  shift
  # One process: these tests size KV caches from the GPU's free memory.
  python3 -m pytest -q -p no:cacheprovider -m gpu --durations=5 ${ENGINE_TESTS_K:+-k "$ENGINE_TESTS_K"} \
    tests/test_gpu_engine.py 2>&1 \
    | tee "$OUT/gpu_engine_tests.log" | tail -15
fi
if [ "${1:-}" = "profile" ]; then
  shift
  python3 benchmarks/profile_decode.py --out "$OUT/profile.json" 2>&1 | tee "$OUT/profile.log" | tail -50
fi
if [ "${1:-}" = "host" ]; then
  shift
  python3 benchmarks/host_overhead.py --out "$OUT/host_overhead.json" 2>&1 | tee "$OUT/host_overhead.log" | tail -70
fi
if [ "${1:-}" = "timeline" ]; then
  shift
  python3 benchmarks/w1_timeline.py --out "$OUT/w1_timeline.json" 2>&1 | tee "$OUT/w1_timeline.log" | tail -12
fi
if [ "${1:-}" = "tp" ]; then
  shift
  # tp.py (2 GPUs); should it run past TP_LIMIT_S seconds, rank 0 and its workers print their Python stacks into the
  # log (faulthandler on SIGABRT; the workers inherit the setting and rank 0's stderr) and end.
  export PYTHONFAULTHANDLER=1
  python3 benchmarks/tp.py --out "$OUT/tp.json" "$@" > "$OUT/tp.log" 2>&1 &
  main=$!
  ( sleep "${TP_LIMIT_S:-480}"
    pkill -ABRT -f "hf_minivllm.tp.worker import main"
    kill -ABRT "$main" ) > /dev/null 2>&1 &  # holds none of this call's output open
  watcher=$!
  wait "$main"
  echo "tp.py exit status $?"
  pkill -P "$watcher" 2>/dev/null  # its sleep, then itself
  kill "$watcher" 2>/dev/null
  grep -v "it/s\]" "$OUT/tp.log" | tail -40
fi
if [ "${1:-}" = "bench" ]; then
  shift
  python3 benchmarks/bench_gpu.py --out "$OUT/bench_gpu.json" "$@" 2>&1 | grep -v "it/s\]" | tee "$OUT/bench_gpu.log" | tail -60
fi
