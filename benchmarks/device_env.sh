# Source this on a GPU machine that already has torch, transformers and triton but no network (our H100 runs):
# an editable install without build isolation (pyproject's package-dir mapping puts kernels/ and patches/ at
# hf_minivllm.kernels / hf_minivllm.patches), and the benchmarks folder on PYTHONPATH for its workloads module.
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e "$repo_root" >/dev/null 2>&1 \
  || echo "device_env.sh: editable install failed" >&2
export PYTHONPATH="$repo_root/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
