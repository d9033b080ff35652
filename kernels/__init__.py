"""Apply packed token bitmasks to a batch's logits in place: one op, several implementations.

Token t of a mask row is bit t & 31 of int32 word t >> 5; a 0 bit sets the logit to -inf.
Columns past the mask (a padded vocabulary) are disallowed; masks wider than the logits
are cut. Two ways to name a row's mask:

- given rows (`apply_token_bitmask`): a [R, W] bitmask sent with the step, row i applying
  to logits row `indices[i]` (or i);
- gathered rows (`apply_token_bitmask_gathered`): a device-resident table [S, W] of
  per-state masks and one int32 per logits row naming its table row (-1: unconstrained),
  so a step moves one integer per row instead of W words.

Implementations, one module each: `cuda` (csrc/, an optional compiled extension),
`triton` (any CUDA GPU; also runs under TRITON_INTERPRET=1), `torch` (CPU, and anywhere).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable

import torch

from dotllm.settings import MASK_KERNELS

_Apply = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], None]


def _load(name: str) -> _Apply | None:
    module = {"cuda": "dotllm.kernels.cuda_bitmask", "triton": "dotllm.kernels.triton_bitmask",
              "torch": "dotllm.kernels.torch_bitmask"}[name]
    try:
        return importlib.import_module(module).apply
    except ImportError:
        return None


def available(device: torch.device) -> list[str]:
    """Kernels that run on `device`, fastest first (measured on H100: bench/RESULTS.md)."""
    names = ["cuda", "triton", "torch"] if device.type == "cuda" else ["torch"]
    if device.type == "cpu" and _interpreting_triton():
        names.insert(0, "triton")
    return [name for name in names if _load(name) is not None]


def _interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_name(kernel: str, device: torch.device) -> str:
    """The implementation `kernel` ("auto" or a name) means on `device`; ValueError if none."""
    if kernel not in MASK_KERNELS:
        raise ValueError(f"unknown mask kernel {kernel!r}; choose from {', '.join(MASK_KERNELS)}")
    names = available(device)
    if kernel == "auto":
        return names[0]
    if kernel not in names:
        raise ValueError(f"mask kernel {kernel!r} is not available on {device.type}; "
                         f"available: {', '.join(names)}")
    return kernel


@functools.cache
def implementation(kernel: str, device_type: str) -> _Apply:
    """`kernel`'s apply(logits, masks, logit_rows, mask_rows) on this device type, for
    callers that check their tensors once (`BitmaskStager`): it checks nothing itself."""
    return _load(kernel_name(kernel, torch.device(device_type)))


def _check(logits: torch.Tensor, masks: torch.Tensor, *index: torch.Tensor | None) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("logits must be [batch, vocab] with contiguous rows")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits must be float32, bfloat16 or float16, not {logits.dtype}")
    if masks.dim() != 2 or masks.dtype != torch.int32 or masks.stride(1) != 1:
        raise ValueError("bitmask must be int32 [rows, words] with contiguous rows")
    for t in index:
        if t is not None and (t.dim() != 1 or t.dtype != torch.int32):
            raise ValueError("row indices must be a 1-D int32 tensor")
        if t is not None and t.device != logits.device:
            raise ValueError("row indices must be on the logits' device")
    if masks.device != logits.device:
        raise ValueError("bitmask must be on the logits' device")


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                        indices: torch.Tensor | None = None, *, kernel: str = "auto") -> None:
    """Mask logits[indices[i]] (or logits[i]) with bitmask[i], in place."""
    _check(logits, bitmask, indices)
    if indices is not None and len(indices) != len(bitmask):
        raise ValueError(f"{len(indices)} indices for {len(bitmask)} bitmask rows")
    if indices is None and len(bitmask) > len(logits):
        raise ValueError(f"{len(bitmask)} bitmask rows for {len(logits)} logits rows")
    implementation(kernel, logits.device.type)(logits, bitmask, indices, None)


def apply_token_bitmask_gathered(logits: torch.Tensor, table: torch.Tensor,
                                 row_ids: torch.Tensor, *, kernel: str = "auto") -> None:
    """Mask logits[b] with table[row_ids[b]] where row_ids[b] >= 0, in place."""
    _check(logits, table, row_ids)
    if len(row_ids) > len(logits):
        raise ValueError(f"{len(row_ids)} row ids for {len(logits)} logits rows")
    implementation(kernel, logits.device.type)(logits, table, None, row_ids)
