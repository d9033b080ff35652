"""Build hook for what pyproject.toml cannot declare: native extensions (csrc/), added
only where CUDA and nvcc are present, so a plain CPU install never needs a compiler."""

from __future__ import annotations

import os

from setuptools import setup


def cuda_extensions() -> tuple[list, dict]:
    if os.environ.get("DOTLLM_BUILD_CUDA", "auto") == "0":
        return [], {}
    try:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if CUDA_HOME is None:
        return [], {}
    ext = CUDAExtension(
        "dotllm._bitmask_cuda", ["csrc/bitmask.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
    )
    return [ext], {"build_ext": BuildExtension}


extensions, cmdclass = cuda_extensions()
setup(ext_modules=extensions, cmdclass=cmdclass)
