# Sourced by the GPU scripts, in the last of the four vLLM staging calls
# (../shared/gpu/README.md): assemble vLLM, add DotLLM's own runtime dependencies
# (requirements/dotllm.lock, carried as wheels for python3.12 in .gpu/wheels:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .gpu/wheels -r requirements/dotllm.lock
# ) and export what the scripts run with.
# Carried ignored folders (run's `carry`) other than the staging parts came back
# "not_carried" on 2026-12-05: the data and the wheels travel instead as an untracked,
# not ignored folder gpucarry/ (wheels/, data/) with the working tree, put in place here.
# It is needed only in the last staging call: with the 60 MB of p1 or p2 beside it, the
# tree came near the carry limit (64 MiB) and one call was refused (2026-12-07): move
# it out of the tree for the first parts.
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d gpucarry ]; then mkdir -p .gpu && cp -r gpucarry/. .gpu/; fi
# Run from the tree, not installed: dotllm.kernels is kernels/ (pyproject's package-dir).
rm -rf dotllm/kernels && ln -s ../kernels dotllm/kernels
# In the last part only (p4 by default; p3 with `stage-vllm 57`); a machine still warm
# from an earlier call keeps the assembled site.
[ -d "$HOME/dotllm-site/vllm" ] || bash .gpu/p*/assemble.sh
site=$HOME/dotllm-site
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" \
    .gpu/wheels/*.whl 2>&1 | grep -v "WARNING: Target directory" || true
export PYTHONPATH=$site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
# Seconds a script's main run may take: its own default ($1), or, in a call that also set
# the machine up, what is left until DEADLINE (epoch seconds: the call's start plus a
# little under its limit, e.g. `DEADLINE=$(( $(date +%s) + 570 )) bash bench/...`).
call_left() {
    if [ -n "${DEADLINE:-}" ]; then echo $((DEADLINE - $(date +%s))); else echo "$1"; fi
}
# A fresh machine's first server start spends ~80 s compiling the model (torch.compile,
# Triton) that later starts read from these caches: a script that served ends with
# `keep_compile_caches` ($OUT/compile-caches.tgz, if under the 16 MiB a file that comes
# back), and the caches carried as gpucarry/compile-caches.tgz are put in place here.
compile_caches=("$HOME/.cache/vllm" "$HOME/.triton")
[ ! -f .gpu/compile-caches.tgz ] || tar xzf .gpu/compile-caches.tgz -C /
keep_compile_caches() {
    local present=() dir
    for dir in "${compile_caches[@]}"; do [ ! -d "$dir" ] || present+=("${dir#/}"); done
    [ ${#present[@]} -gt 0 ] || return 0
    tar czf /tmp/compile-caches.tgz -C / "${present[@]}"
    local size
    size=$(stat -c %s /tmp/compile-caches.tgz)
    echo "compile caches: $((size / 1048576)) MiB (${present[*]})"
    [ "$size" -ge 16777216 ] || cp /tmp/compile-caches.tgz "$OUT/"
}
