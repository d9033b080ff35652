#!/usr/bin/env bash
# Serve the embedded model with `dotllm serve` on the GPU in both model runners, checking
# constrained outputs and which kernel masked them, and device states on CUDA (the ops, the
# arena's random walks, served with async scheduling) (after the three staging part calls):
#   run(carry=[".gpu/p4"], command="bash bench/gpu_serving.sh")
set -euo pipefail
source bench/gpu_setup.sh
python3 -c "import dotllm.kernels as k, torch; print('kernels:', k.available(torch.device('cuda')))"
# On a fresh machine the setup (vLLM assembled, the CUDA kernels built) takes ~200 s of the
# last staging call and the first server start ~150 s (torch.compile's cache cold; ~70 s
# after): in that call, run no server test or give the call its whole 600 s (2026-12-07).
# pytest reports a failure's details at its end: TESTS_TIMEOUT_S stops it before the
# device call's limit, so the report and the servers' logs still come back (2026-12-06:
# a call's limit took both, and left one failure unexplained). Arguments go to pytest.
timeout "${TESTS_TIMEOUT_S:-540}" python3 -m pytest -q -p no:cacheprovider -rf --tb=short \
    tests/test_gpu_serving.py tests/test_device_states.py -m gpu "$@" 2>&1 \
    | tee "$OUT/tests.log" | tail -60 || true
for log in /tmp/pytest-of-*/pytest-*/dotllm-serve[0-9]*/server.log; do
    cp "$log" "$OUT/$(basename "$(dirname "$log")").log"
done
