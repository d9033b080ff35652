#!/usr/bin/env bash
# Serve the embedded model with `dotllm serve` on the GPU in both model runners, checking
# constrained outputs and which kernel masked them, and device states on CUDA (the ops, the
# arena's random walks, served with async scheduling) (after the three staging part calls):
#   run(carry=[".gpu/p4"], command="bash bench/gpu_serving.sh")
set -euo pipefail
source bench/gpu_setup.sh
python3 -c "import dotllm.kernels as k, torch; print('kernels:', k.available(torch.device('cuda')))"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu_serving.py tests/test_device_states.py \
    -m gpu 2>&1 | tee "$OUT/tests.log" | tail -40
for log in /tmp/pytest-of-*/pytest-*/dotllm-serve[0-9]*/server.log; do
    cp "$log" "$OUT/$(basename "$(dirname "$log")").log"
done
