# Sourced by the GPU scripts that serve: vLLM and DotLLM's dependencies (gpu_site.sh),
# DotLLM's CUDA kernel built in place, and what `pip install -e .` would register (the
# vLLM plugin, the `dotllm` command) without pip (no network, no build isolation).
source bench/gpu_site.sh
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
