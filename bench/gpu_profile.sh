#!/usr/bin/env bash
# Issue 12's step profile on the GPU, the 1.3B Llama-shaped model with dummy weights
# (after the three staging part calls; each engine's server start costs ~70-140 s there):
#   run(carry=[".gpu/p4"], command="bash bench/gpu_profile.sh dotllm")
#   run(carry=[".gpu/p4"], command="bash bench/gpu_profile.sh xgrammar")
set -euo pipefail
source bench/gpu_setup.sh
# The profiler is a vLLM plugin of the benchmark's own, registered here only.
info=$site/dotllm_step_profile-0.1.0.dist-info
mkdir -p "$info"
printf 'Metadata-Version: 2.1\nName: dotllm-step-profile\nVersion: 0.1.0\n' > "$info/METADATA"
printf '[vllm.general_plugins]\ndotllm_step_profile = bench.step_profile:install\n' \
    > "$info/entry_points.txt"
nvidia-smi --query-gpu=name --format=csv,noheader
model=$(python3 -m bench.full_size_model /tmp/llama-1.3b)
# PYSPY=1: a sampling profile of the first engine core and the worker processes it starts
# (none with `--serve-arg=--distributed-executor-backend=uni`: the worker runs in its
# thread) from its start to its end, collapsed stacks by process and thread, from the
# py-spy wheel carried in gpucarry/wheels (pip download py-spy ... as for the lock's wheels).
if [ -n "${PYSPY:-}" ]; then
    (until pid=$(pgrep -o -f EngineCore); do sleep 1; done
     "$site/bin/py-spy" record --nonblocking --subprocesses --threads --format raw --rate 200 -p "$pid" \
         -o "$OUT/engine-core.pyspy.txt" > "$OUT/py-spy.log" 2>&1) &
fi
# Each repeat's line is kept as it ends (a device call's limit brings back what is under
# $OUT, not a killed process's summary); PROFILE_TIMEOUT_S (or DEADLINE) stops it first.
engines=()
for arg in "$@"; do [[ $arg == -* ]] && break; engines+=("$arg"); done
name=$(IFS=-; echo "${engines[*]}")
JSONSCHEMABENCH_DIR=$PWD/.gpu/data timeout "$(call_left "${PROFILE_TIMEOUT_S:-540}")" \
    python3 -m bench.step_profile --model "$model" \
    --engines "$@" --serve-arg=--load-format=dummy --out "$OUT/step-profile-$name.json" \
    --timelines "$OUT/timelines-$name.json.gz" \
    2> "$OUT/step-profile-stderr.log" | tee "$OUT/step-profile-$name.jsonl" | grep -v '^{' || true
# The raw stacks run past what a device call brings back (2026-12-06): compressed.
if [ -n "${PYSPY:-}" ]; then
    wait
    gzip -f "$OUT/engine-core.pyspy.txt" 2>/dev/null || true
fi
keep_compile_caches
