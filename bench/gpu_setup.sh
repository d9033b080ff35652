# Sourced by the GPU scripts that serve: vLLM and DotLLM's dependencies (gpu_site.sh),
# DotLLM's CUDA kernel built in place, and what `pip install -e .` would register (the
# vLLM plugin, the `dotllm` command) without pip (no network, no build isolation).
source bench/gpu_site.sh
# The kernels an earlier machine built from the same sources with the same torch come back
# as $OUT/cuda-ext.tgz; carried as gpucarry/cuda-ext.tgz (a .so would be git-ignored and
# stay behind), they skip the build (~1-2 min of a fresh machine's setup).
if [ -n "${NO_CUDA_BUILD:-}" ]; then  # a short call: the Triton kernels serve instead
    echo "CUDA kernels not built (NO_CUDA_BUILD)" > "$OUT/build.log"
else
    [ ! -f .gpu/cuda-ext.tgz ] || tar xzf .gpu/cuda-ext.tgz -C .gpu
    ext_key=$( (cat setup.py csrc/*; python3 -c "import torch; print(torch.__version__)") \
        | sha256sum | cut -c1-16)
    if [ -f ".gpu/cuda-ext/$ext_key" ]; then
        cp .gpu/cuda-ext/*.so dotllm/
        echo "CUDA kernels carried ($ext_key)" > "$OUT/build.log"
    else
        SECONDS=0
        TORCH_CUDA_ARCH_LIST=9.0 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
            || { tail -30 "$OUT/build.log"; exit 1; }
        echo "built in $SECONDS s" >> "$OUT/build.log"
        mkdir -p /tmp/cuda-ext/cuda-ext && cp dotllm/_*_cuda*.so /tmp/cuda-ext/cuda-ext/ \
            && touch "/tmp/cuda-ext/cuda-ext/$ext_key" \
            && tar czf "$OUT/cuda-ext.tgz" -C /tmp/cuda-ext cuda-ext
    fi
fi
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
