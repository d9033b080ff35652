"""Defaults that make `dotllm serve` work out of the box on a machine without a GPU.

Each is only a default: an explicit option or environment variable wins.
"""

from __future__ import annotations

from collections.abc import MutableMapping

# bf16 falls back to a slow path on AVX2 CPUs; the KV cache would otherwise default to
# a large share of a small machine's memory; a CPU box here has no network.
CPU_OPTIONS = {"dtype": "float32"}
CPU_ENVIRONMENT = {"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def apply_environment(environ: MutableMapping[str, str], on_gpu: bool) -> dict[str, str]:
    """Set the CPU environment defaults that are not already set; returns those set."""
    if on_gpu:
        return {}
    added = {k: v for k, v in CPU_ENVIRONMENT.items() if k not in environ}
    environ.update(added)
    return added


def option_defaults(on_gpu: bool) -> dict[str, str]:
    return {} if on_gpu else dict(CPU_OPTIONS)
