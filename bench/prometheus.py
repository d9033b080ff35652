"""Reading a server's /metrics as a benchmark or test does: samples by name, and whether
compiles are still under way (requests no longer wait for theirs, so they can outlive them)."""

from __future__ import annotations


def samples(text: str) -> dict[str, float]:
    """Prometheus exposition text -> {'name{labels}': value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def compiling(m: dict[str, float]) -> bool:
    """Whether a compile the pool started has not finished, been cancelled or failed."""
    finished = m.get("dotllm_constraint_compile_seconds_count", 0) + m.get(
        "dotllm_constraint_cancelled_total", 0) + sum(
        v for k, v in m.items() if k.startswith("dotllm_constraint_failures_total"))
    return m.get("dotllm_constraint_compiles_total", 0) > finished


def increase(before: dict, after: dict, name: str) -> float:
    """How much a counter grew between two readings, over all its label sets."""
    def total(m: dict[str, float]) -> float:
        return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))
    return total(after) - total(before)


def _histogram(m: dict[str, float], name: str) -> tuple[float, float]:
    """(sum, count) of a histogram over all its label sets."""
    total = count = 0.0
    for key, value in m.items():
        if key.startswith(name + "_sum"):
            total += value
        elif key.startswith(name + "_count"):
            count += value
    return total, count


def mean_between(before: dict, after: dict, name: str) -> float:
    """The mean of what a histogram observed between two readings (nan: nothing). vLLM's
    latency buckets (10, 25, 50 ms...) are too coarse for quantiles of a decode step."""
    (s0, c0), (s1, c1) = _histogram(before, name), _histogram(after, name)
    return (s1 - s0) / (c1 - c0) if c1 > c0 else float("nan")
