#!/usr/bin/env bash
# The serving benchmark (python -m bench.serve) on the GPU: the 1.3B Llama-shaped config
# with dummy weights, every scenario, concurrency 1-256 (after the three staging part calls;
# a server start costs ~70-140 s there: one or two engines a call), with a copy of
# ../shared/data/jsonschemabench carried along:
#   mkdir -p .gpu/data && cp ../shared/data/jsonschemabench/*.gz .gpu/data/
#   run(carry=[".gpu/p4", ".gpu/data"], command="bash bench/gpu_bench_serve.sh dotllm")
#   run(carry=[".gpu/p4", ".gpu/data"], command="bash bench/gpu_bench_serve.sh xgrammar")
# then here, with each call's serve/results.jsonl concatenated into DIR/results.jsonl:
#   .venv/bin/python -m bench.serve --report DIR      # summary.md and the plots
set -euo pipefail
source bench/gpu_setup.sh
nvidia-smi --query-gpu=name --format=csv,noheader
model=$(python3 -m bench.full_size_model /tmp/llama-1.3b)
JSONSCHEMABENCH_DIR=$PWD/.gpu/data python3 -m bench.serve --engines "$@" --model "$model" \
    --serve-arg=--load-format=dummy --scenarios free enum-array long-string mix-20 mix-80 \
    schema schema-compact regex choice unique --concurrency 1 16 64 256 --tokens 128 \
    --repeats 3 --out "$OUT/serve" 2> "$OUT/serve-stderr.log"
