"""The serving benchmark's plots (matplotlib, small PNGs fit to commit), each drawn only
where its results exist: step cost and TTFT against concurrency per engine, throughput at
equal work, the TTFT distribution of real schemas cold and warm, and the share of them each
engine served and answered validly."""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the headless backend is chosen)
import numpy as np  # noqa: E402

from bench.scenarios import BASELINES, STEP_COMPARED  # noqa: E402

DPI = 80


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _by_concurrency(batches: list[dict], value) -> dict[tuple, tuple[list, list]]:
    """(engine, scenario) -> (concurrencies, median of value over repeats)."""
    groups: dict[tuple, dict[int, list[float]]] = {}
    for b in batches:
        v = value(b)
        if v == v:  # not nan
            groups.setdefault((b["engine"], b["scenario"]), {}).setdefault(
                b["concurrency"], []).append(v)
    return {key: (sorted(per), [statistics.median(per[c]) for c in sorted(per)])
            for key, per in groups.items()}


def _against_concurrency(batches: list[dict], value, ylabel: str, title: str,
                         path: Path) -> Path | None:
    lines = _by_concurrency(batches, value)
    chosen = [s for s in dict.fromkeys(b["scenario"] for b in batches) if any(
        key[1] == s for key in lines)]
    if not chosen:
        return None
    cols = min(4, len(chosen))
    rows = -(-len(chosen) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False,
                             sharey=True)
    for ax, scenario in zip(axes.flat, chosen, strict=False):
        for (engine, s), (xs, ys) in lines.items():
            if s == scenario:
                ax.plot(xs, ys, marker="o", label=engine)
        ax.set_xscale("log", base=2)
        ax.set_title(scenario, fontsize=9)
        ax.set_xlabel("concurrent requests")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(chosen):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _throughput(batches: list[dict], path: Path) -> Path | None:
    """tokens/s at equal work at the highest concurrency measured."""
    equal = [b for b in batches if b["scenario"] in STEP_COMPARED]
    if not equal:
        return None
    top = max(b["concurrency"] for b in equal)
    equal = [b for b in equal if b["concurrency"] == top]
    engines = list(dict.fromkeys(b["engine"] for b in equal))
    chosen = list(dict.fromkeys(b["scenario"] for b in equal))
    width = 0.8 / len(engines)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(chosen), 3.0))
    for i, engine in enumerate(engines):
        heights = []
        for s in chosen:
            rates = [sum(b["tokens"]) / b["wall_s"] for b in equal
                     if b["engine"] == engine and b["scenario"] == s]
            heights.append(statistics.median(rates) if rates else 0)
        ax.bar(np.arange(len(chosen)) + i * width, heights, width, label=engine)
    ax.set_xticks(np.arange(len(chosen)) + width * (len(engines) - 1) / 2, chosen, fontsize=8)
    ax.set_ylabel("tokens/s (batch)")
    ax.set_title(f"equal work, {top} concurrent requests", fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _unique_ttft(unique: list[dict], path: Path) -> Path | None:
    """The TTFT distribution (ECDF) of real schemas, cold solid, warm dashed."""
    served = [r for r in unique if r["status"] == "ok"]
    if not served:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3.0))
    for n, engine in enumerate(dict.fromkeys(r["engine"] for r in served)):
        for phase, style in (("cold", "-"), ("warm", "--")):
            ttft = sorted(r["ttft_s"] for r in served
                          if r["engine"] == engine and r["phase"] == phase)
            if ttft:
                ax.step(ttft, np.arange(1, len(ttft) + 1) / len(ttft), style, where="post",
                        color=f"C{n}", label=f"{engine} {phase}")
    ax.set_xscale("log")
    ax.set_xlabel("time to first token, s")
    ax.set_ylabel("share of served requests")
    ax.set_title("real schemas, each new to the server (cold), then again", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _coverage(unique: list[dict], path: Path) -> Path | None:
    """Per subset and engine (cold requests): the share of schemas served, and the share
    of ended answers that validate (with random weights many run to max_tokens, so valid
    of all would mostly count which answers ended)."""
    cold = [r for r in unique if r["phase"] == "cold"]
    if not cold:
        return None
    engines = list(dict.fromkeys(r["engine"] for r in cold))
    subsets = list(dict.fromkeys(r["subset"] for r in cold))
    width = 0.8 / len(engines)
    fig, (left, right) = plt.subplots(1, 2, figsize=(1.5 + 3.0 * len(subsets), 3.0),
                                      sharey=True)
    for i, engine in enumerate(engines):
        served, valid, labels = [], [], []
        for subset in subsets:
            rows = [r for r in cold if r["engine"] == engine and r["subset"] == subset]
            ended = [r for r in rows if r["status"] == "ok" and r["ended"]]
            served.append(sum(r["status"] == "ok" for r in rows) / max(1, len(rows)))
            good = sum(bool(r["valid"]) for r in ended)
            valid.append(good / max(1, len(ended)))
            labels.append(f"{good}/{len(ended)}")
        x = np.arange(len(subsets)) + i * width
        left.bar(x, served, width, color=f"C{i}", label=engine)
        bars = right.bar(x, valid, width, color=f"C{i}", label=engine)
        right.bar_label(bars, labels, fontsize=6)
    for ax, title in ((left, "schemas served"), (right, "ended answers valid")):
        ax.set_xticks(np.arange(len(subsets)) + width * (len(engines) - 1) / 2, subsets,
                      fontsize=8)
        ax.set_title(title, fontsize=9)
    left.set_ylim(0, 1.3)
    left.set_ylabel("share (cold requests)")
    left.legend(fontsize=7, loc="upper center", ncol=len(engines))
    return _save(fig, path)


def plot_all(batches: list[dict], unique: list[dict], ratios: dict[tuple, list[float]],
             out_dir: Path) -> list[Path]:
    """`ratios`: (engine, scenario, concurrency) -> a step over the free step, per repeat."""
    equal = [b for b in batches if b["scenario"] in STEP_COMPARED]
    drawn = [
        _against_concurrency(equal, lambda b: b["engine_itl_s"] * 1e3, "ms per step (vLLM)",
                             "the cost of a decode step at equal work", out_dir / "step.png"),
        _against_concurrency(
            [dict(b, engine_itl_s=statistics.median(ratios[b["engine"], b["scenario"],
                                                            b["concurrency"]]))
             for b in equal if b["scenario"] not in BASELINES and (b["engine"], b["scenario"],
                                                            b["concurrency"]) in ratios],
            lambda b: b["engine_itl_s"], "x the same server's free step",
            "a constrained step over an unconstrained one", out_dir / "step-ratio.png"),
        _against_concurrency(batches, lambda b: statistics.median(
            [t for t in b["ttft_s"] if t == t] or [float("nan")]) * 1e3,
            "median TTFT, ms (client)", "time to first token", out_dir / "ttft.png"),
        _throughput(batches, out_dir / "throughput.png"),
        _unique_ttft(unique, out_dir / "unique-ttft.png"),
        _coverage(unique, out_dir / "coverage.png"),
    ]
    return [p for p in drawn if p is not None]
