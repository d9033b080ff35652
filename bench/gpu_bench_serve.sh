#!/usr/bin/env bash
# The serving benchmark (python -m bench.serve) on the GPU: the 1.3B Llama-shaped config
# with dummy weights, every scenario, concurrency 1-256, and issue 14's cold batch (64 real
# schemas of Glaiveai2K and of Github_easy at once each). After the three staging part
# calls; a server start costs ~70-140 s there: one or two engines a call. Arguments go to
# bench.serve after these defaults (a later option wins), with a copy of
# ../shared/data/jsonschemabench and the wheels of requirements/dotllm.lock in gpucarry/
# (untracked, not ignored: it travels with the working tree; gpu_site.sh):
#   mkdir -p gpucarry/data && cp ../shared/data/jsonschemabench/*.gz gpucarry/data/
#   pip download ... -d gpucarry/wheels -r requirements/dotllm.lock   (gpu_site.sh)
#   run(carry=[".gpu/p4"], command="bash bench/gpu_bench_serve.sh --engines dotllm")
#   run(carry=[".gpu/p4"], command="bash bench/gpu_bench_serve.sh --engines xgrammar")
# (NAME=drafts before bash: results in $OUT/drafts). Then here, with each call's
# serve/results.jsonl concatenated into DIR/results.jsonl:
#   .venv/bin/python -m bench.serve --report DIR      # summary.md and the plots
set -euo pipefail
source bench/gpu_setup.sh
nvidia-smi --query-gpu=name --format=csv,noheader
model=$(python3 -m bench.full_size_model /tmp/llama-1.3b)
# The device tool brings back at most 8 files a call: the servers' logs as one file, and
# no plots (`bench.serve --report DIR` draws them here from results.jsonl).
out="$OUT/${NAME:-serve}"
trap 'rm -f "$out"/*.png; [ ! -d "$out/logs" ] || { tar czf "$out/logs.tgz" -C "$out" logs && rm -rf "$out/logs"; }; keep_compile_caches' EXIT
# Stopped (bench.serve stops its server, the trap still packs the logs) before the device
# call's own limit kills everything and brings nothing back: BENCH_TIMEOUT_S.
JSONSCHEMABENCH_DIR=$PWD/.gpu/data timeout "$(call_left "${BENCH_TIMEOUT_S:-520}")" \
    python3 -m bench.serve --model "$model" \
    --serve-arg=--load-format=dummy --scenarios free enum-array long-string mix-20 mix-80 \
    schema schema-compact regex choice schema-mix unique --concurrency 1 16 64 256 --tokens 128 \
    --repeats 3 --subsets Glaiveai2K Github_easy --unique-schemas 64 \
    --unique-concurrency 64 --out "$out" "$@" 2> "$out-stderr.log"
