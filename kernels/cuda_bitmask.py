"""Packed-bitmask application by DotLLM's CUDA kernel (csrc/bitmask.cu).

The extension is built by setup.py where CUDA and nvcc are present; without it this
module does not import, and the dispatcher offers the other kernels.
"""

from __future__ import annotations

from dotllm._bitmask_cuda import apply

__all__ = ["apply"]
