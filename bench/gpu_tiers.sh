#!/usr/bin/env bash
# bench/tiers_serving.py on the GPU (after the three staging part calls), with a copy of
# ../shared/data/jsonschemabench carried along:
#   mkdir -p .gpu/data && cp ../shared/data/jsonschemabench/*.gz .gpu/data/
#   run(carry=[".gpu/p4", ".gpu/data"], command="bash bench/gpu_tiers.sh tiered stock")
# Arguments: the engines (each server start costs ~70 s there: split them over calls).
set -euo pipefail
source bench/gpu_setup.sh
nvidia-smi --query-gpu=name --format=csv,noheader
JSONSCHEMABENCH_DIR=$PWD/.gpu/data python3 -m bench.tiers_serving --sample 5 --engines "$@" \
    --json "$OUT/tiers-$(IFS=-; echo "$*").json" 2> "$OUT/tiers-stderr.log" | grep -v '^\['
