"""Build hook for what pyproject.toml cannot declare: native extensions (csrc/), added
only where CUDA and nvcc are present, so a plain CPU install never needs a compiler."""

from __future__ import annotations

import os

from setuptools import setup


def cuda_extensions() -> tuple[list, dict]:
    """DOTLLM_BUILD_CUDA: 0 never, 1 always (TORCH_CUDA_ARCH_LIST names the GPUs where none
    is visible), auto (default) where nvcc and a GPU or TORCH_CUDA_ARCH_LIST are present."""
    mode = os.environ.get("DOTLLM_BUILD_CUDA", "auto")
    if mode == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    # torch guesses a CUDA_HOME even where there is no toolkit: require its nvcc.
    has_nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    targets_known = torch.cuda.is_available() or "TORCH_CUDA_ARCH_LIST" in os.environ
    if mode != "1" and not (has_nvcc and targets_known):
        return [], {}
    flags = {"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]}
    exts = [CUDAExtension(f"dotllm._{op}_cuda", [f"csrc/{op}.cu"], extra_compile_args=flags)
            for op in ("bitmask", "states")]
    return exts, {"build_ext": BuildExtension}


extensions, cmdclass = cuda_extensions()
setup(ext_modules=extensions, cmdclass=cmdclass)
