#!/usr/bin/env bash
# Issue 14's TTFT when a constraint must compile (python -m bench.overlap) on the GPU, the
# 1.3B Llama-shaped model with dummy weights, prompts of 1k, 4k and 16k tokens (its
# config's 4,096 positions raised to 20,000: a position past the rotary cache failed a
# device-side assert and took the engine down on 2026-12-06). After the three staging
# part calls; a server start costs ~70-140 s there, so one or two servers a call:
#   run(carry=[".gpu/p3"], command="bash bench/gpu_overlap.sh --servers waiting waiting-off")
#   run(carry=[".gpu/p3"], command="bash bench/gpu_overlap.sh --servers tiered xgrammar")
# Arguments go to bench.overlap after these defaults (a later option wins).
set -euo pipefail
source bench/gpu_setup.sh
nvidia-smi --query-gpu=name --format=csv,noheader
model=$(python3 -m bench.full_size_model /tmp/llama-1.3b-20k --max-positions 20000)
python3 -m bench.overlap --model "$model" --serve-arg=--load-format=dummy \
    --serve-arg=--max-model-len=20000 --prompt-tokens 1000 4000 16000 --repeats 3 \
    --out "$OUT/overlap.jsonl" "$@" 2> "$OUT/overlap-stderr.log"
