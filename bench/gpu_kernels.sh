#!/usr/bin/env bash
# One device call: build the CUDA kernel, run the kernel tests on the GPU, time every kernel.
# From the repo root on the GPU machine (torch + Triton there, no vLLM), carrying .whl with
# xgrammar 0.2.8 and what it needs that the machine lacks, fetched here once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2 \
#     pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
#   run(kind="nvidia-h100-x1", carry=[".whl"], command="bash bench/gpu_kernels.sh")
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# dotllm.kernels is kernels/ (pyproject.toml package-dir); run from the tree: a link
rm -rf dotllm/kernels && ln -s ../kernels dotllm/kernels
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
# A failed build is reported and the rest runs without the CUDA kernel (tests skip it).
if TORCH_CUDA_ARCH_LIST=9.0 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
    echo "cuda kernel built: $(ls dotllm/_bitmask_cuda*.so)"
else
    tail -40 "$OUT/build.log"; echo "CUDA KERNEL BUILD FAILED"
fi
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -15 | tee "$OUT/tests.log"
python3 -m pytest -q -p no:cacheprovider bench/test_mask_kernels.py ${BENCH_ARGS:-} \
    --benchmark-enable --benchmark-only --benchmark-json "$OUT/bench.json" \
    --benchmark-columns=median > "$OUT/bench.log" 2>&1 || { tail -30 "$OUT/bench.log"; exit 1; }
python3 -m bench.mask_kernels_report "$OUT/bench.json" | tee "$OUT/table.md"
