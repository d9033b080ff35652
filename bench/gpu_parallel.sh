#!/usr/bin/env bash
# Issue 17 on two GPUs (the nvidia-h200-x2 kind, after the three staging part calls):
# tests/test_parallel.py's two-GPU test (tensor and pipeline parallel, every rank's
# kernel), then a short throughput comparison with stock vLLM on the same two GPUs:
#   run(kind="nvidia-h200-x2", carry=[".gpu/p4"], command="bash bench/gpu_parallel.sh")
set -euo pipefail
source bench/gpu_setup.sh
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider tests/test_parallel.py -k two_gpus 2>&1 \
    | tee "$OUT/parallel-tests.log" | tail -20
model=$(python3 -m bench.full_size_model /tmp/llama-1.3b)
python3 -m bench.serve --engines dotllm xgrammar --model "$model" \
    --serve-arg=--load-format=dummy --serve-arg=--tensor-parallel-size=2 \
    --scenarios free enum-array schema --concurrency 16 128 --tokens 128 --repeats 2 \
    --out "$OUT/serve-tp2" 2> "$OUT/serve-tp2-stderr.log"
