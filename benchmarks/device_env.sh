# Source this on a GPU machine with torch/transformers/triton already installed but no network (our H100 runs):
# it lays the package out under /tmp/hf_minivllm_pkg exactly as pyproject's package-dir mapping installs it
# (kernels/ -> hf_minivllm.kernels, patches/ -> hf_minivllm.patches) and puts it on PYTHONPATH.
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pkg=/tmp/hf_minivllm_pkg
rm -rf "$pkg" && mkdir -p "$pkg"
cp -r "$repo_root/hf_minivllm" "$pkg/hf_minivllm"
cp -r "$repo_root/kernels" "$pkg/hf_minivllm/kernels"
cp -r "$repo_root/patches" "$pkg/hf_minivllm/patches"
export PYTHONPATH="$pkg:$repo_root/tests:$repo_root/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
