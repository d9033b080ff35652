#!/usr/bin/env bash
# bench/soundness.py on the GPU machine's CPUs (16 cores: one job a core, one compile
# worker each), after the three staging part calls, with ../shared/data carried along:
#   mkdir -p .gpu/data && cp ../shared/data/jsonschemabench/*.gz .gpu/data/
#   run(carry=[".gpu/p4", ".gpu/data", ".gpu/wheels", ".gpu/records"],
#       command="bash bench/gpu_soundness.sh --subsets Snowplow")
# Arguments go to bench.soundness. Each schema's result goes to $OUT/soundness.jsonl as it
# is known, after what .gpu/records/*.jsonl (earlier calls' files) already has, which is
# not run again: a call cut off by its time limit is taken up by the next one (add
# --rerun after a change to DotLLM or the walker).
set -euo pipefail
source bench/gpu_site.sh
jobs=$(nproc)  # before OMP_NUM_THREADS, which nproc obeys
# One thread a job: torch's and llguidance's pools sized to the machine, 16 times over,
# thrash.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
cat .gpu/records/*.jsonl > "$OUT/soundness.jsonl" 2>/dev/null || true
JSONSCHEMABENCH_DIR=$PWD/.gpu/data python3 -m bench.soundness --sample 0 --walks 20 \
    --timeout 20 --workers 1 --jobs "$jobs" --verbose --records "$OUT/soundness.jsonl" \
    "$@" 2> "$OUT/soundness-stderr.log" | tee -a "$OUT/soundness.txt"
