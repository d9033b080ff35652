#!/usr/bin/env bash
# Last of the four vLLM staging calls (../shared/gpu/README.md): assemble vLLM, make DotLLM
# importable with its entry points (vLLM plugin, `dotllm` command) and its CUDA kernel
# built, then serve the embedded model with `dotllm serve` on the GPU in both model
# runners, checking constrained outputs and which kernel masked them:
#   run(carry=[".gpu/p4"], command="bash bench/gpu_serving.sh")
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
bash .gpu/p4/assemble.sh
site=$HOME/dotllm-site
export PYTHONPATH=$site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
TORCH_CUDA_ARCH_LIST=9.0 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { tail -30 "$OUT/build.log"; exit 1; }
# What `pip install -e .` would register, without pip (no network, no build isolation).
info=$site/dotllm-0.1.0.dist-info
mkdir -p "$info"
printf 'Metadata-Version: 2.1\nName: dotllm\nVersion: 0.1.0\n' > "$info/METADATA"
printf '[console_scripts]\ndotllm = dotllm.cli:main\n\n[vllm.general_plugins]\ndotllm = dotllm.vllm_ext.plugin:register\n' \
    > "$info/entry_points.txt"
launcher=$(dirname "$(command -v python3)")/dotllm
# vLLM spawns its engine: the script is re-imported there, so main runs only under __main__.
printf '#!%s\nfrom dotllm.cli import main\nif __name__ == "__main__":\n    raise SystemExit(main())\n' \
    "$(command -v python3)" > "$launcher"
chmod +x "$launcher"
dotllm --version
python3 -c "import dotllm.kernels as k, torch; print('kernels:', k.available(torch.device('cuda')))"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu_serving.py 2>&1 | tee "$OUT/tests.log" \
    | tail -40
for log in /tmp/pytest-of-*/pytest-*/dotllm-serve[0-9]*/server.log; do
    cp "$log" "$OUT/$(basename "$(dirname "$log")").log"
done
