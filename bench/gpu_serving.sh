#!/usr/bin/env bash
# Last of the four vLLM staging calls (../shared/gpu/README.md): assemble vLLM, install
# DotLLM (building its CUDA kernel), serve the embedded model with `dotllm serve` on the GPU
# in both model runners and check constrained outputs and the kernel used:
#   run(carry=[".gpu/p4"], command="bash bench/gpu_serving.sh")
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
bash .gpu/p4/assemble.sh
export PYTHONPATH=$HOME/dotllm-site VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
TORCH_CUDA_ARCH_LIST=9.0 python3 -m pip install -q --no-deps --no-build-isolation --no-index \
    -e . > "$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; exit 1; }
python3 -c "import dotllm.kernels as k, torch; print('kernels:', k.available(torch.device('cuda')))"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu_serving.py tests/test_kernels.py \
    2>&1 | tee "$OUT/tests.log" | tail -30
for log in /tmp/pytest-of-*/pytest-current/dotllm-serve*/server.log; do
    cp "$log" "$OUT/$(basename "$(dirname "$log")").log" 2>/dev/null || true
done
