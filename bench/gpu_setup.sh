# Sourced by the GPU scripts, in the last of the four vLLM staging calls
# (../shared/gpu/README.md): assemble vLLM, build DotLLM's CUDA kernel in place, and
# register what `pip install -e .` would (the vLLM plugin, the `dotllm` command) without
# pip (no network, no build isolation).
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
bash .gpu/p4/assemble.sh
site=$HOME/dotllm-site
export PYTHONPATH=$site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
TORCH_CUDA_ARCH_LIST=9.0 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { tail -30 "$OUT/build.log"; exit 1; }
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
