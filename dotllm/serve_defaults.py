"""Defaults that make `dotllm serve` work out of the box on a machine without a GPU, and
keep a batch of grammars fast on one with a GPU.

Each is only a default: an explicit option or environment variable wins.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path

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


# Device states on a GPU: with vLLM's async scheduling a step's sampling no longer waits
# for the host to accept the last step's tokens (H200, 256 requests on their index: a step
# 0.9x a free one, 1.2x without; the served CUDA tests pass in both model runners). On a
# CPU vLLM turns async scheduling off, so they would only cost.
GPU_DEVICE_STATES_MIB = 512


def dotllm_defaults(on_gpu: bool, environ: Mapping[str, str]) -> dict[str, int]:
    """DotLLM option defaults (parser destinations) for this machine; a DOTLLM_ variable
    the user set wins, as does the option itself."""
    if on_gpu and "DOTLLM_DEVICE_STATES_MIB" not in environ:
        return {"dotllm_device_states_mib": GPU_DEVICE_STATES_MIB}
    return {}


def executor_backend(on_gpu: bool, given: str | None, world_size: int) -> str | None:
    """The worker in a process of its own on one GPU, where vLLM would run it inline in
    the engine core's thread: with grammars in the batch the host work of both
    (scheduling and accepting; preparing inputs and sampling) no longer fits in a forward
    pass there (H200, 256 requests: an index-tier step 2.3x a free one inline, 0.9-1.2x
    in a process of its own). Across GPUs (tensor, pipeline or data parallel) vLLM's own
    choice stands (mp, or ray where Ray places the workers), as does the user's."""
    if on_gpu and given is None and world_size == 1:
        return "mp"
    return given


def bind_cpu_workers(environ: MutableMapping[str, str], world_size: int,
                     numa_nodes: int | None = None, cpus: list[int] | None = None
                     ) -> dict[str, str]:
    """Bind vLLM's CPU workers where it would otherwise refuse to start: it binds one
    worker to a NUMA node and fails with fewer nodes than workers (--tensor-parallel-size
    2 on a one-node box). The allowed CPUs are split evenly, in order, one share a worker
    (VLLM_CPU_OMP_THREADS_BIND); a binding the user set wins."""
    if world_size <= 1 or "VLLM_CPU_OMP_THREADS_BIND" in environ:
        return {}
    if numa_nodes is None:
        numa_nodes = len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))) or 1
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else cpus
    if numa_nodes >= world_size or len(cpus) < world_size:
        return {}
    share = len(cpus) // world_size
    binding = "|".join(",".join(map(str, cpus[i * share:(i + 1) * share]))
                       for i in range(world_size))
    environ["VLLM_CPU_OMP_THREADS_BIND"] = binding
    return {"VLLM_CPU_OMP_THREADS_BIND": binding}
