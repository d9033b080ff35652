"""The bitmask-kernel table from a pytest-benchmark JSON of bench/test_mask_kernels.py.

    python -m bench.mask_kernels_report bench.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

KERNELS = ("cuda", "triton", "xgrammar", "torch")


def main(path: str) -> None:
    benchmarks = json.loads(Path(path).read_text())["benchmarks"]
    rates = {b["extra_info"]["kind"]: b["extra_info"]["bytes_per_round"] / b["stats"]["median"]
             for b in benchmarks if "kind" in b["extra_info"]}
    bandwidth, h2d = rates["copy"], rates.get("h2d")
    print(f"device-to-device copy: {bandwidth / 1e12:.2f} TB/s (read + written)")
    if h2d:
        print(f"host-to-device copy from pinned memory: {h2d / 1e9:.1f} GB/s")
    print()
    cells: dict[tuple, dict[str, float]] = defaultdict(dict)
    floors: dict[tuple, float] = {}
    for b in benchmarks:
        info = b["extra_info"]
        if "form" not in info:
            continue
        key = (info["form"], info["vocab"], info["dtype"], info["density"], info["batch"])
        cells[key][info["kernel"]] = b["stats"]["median"] / info["calls"] * 1e6
        # The staged path also moves its rows over PCIe before the kernel can start.
        floors[key] = (info["floor_bytes"] / bandwidth
                       + (info.get("h2d_bytes", 0) / h2d if h2d else 0)) * 1e6
    print("| form | V | dtype | mask | B | " + " | ".join(f"{k} us" for k in KERNELS)
          + " | floor us | best DotLLM vs xgrammar | best DotLLM / floor |")
    print("|" + "---|" * (9 + len(KERNELS) - 1))
    for key in sorted(cells):
        row = cells[key]
        ours = min((row[k] for k in ("cuda", "triton") if k in row), default=None)
        xgr = row.get("xgrammar")
        speedup = f"{xgr / ours:.2f}x" if ours and xgr else "-"
        vs_floor = f"{ours / floors[key]:.2f}x" if ours else "-"
        times = " | ".join(f"{row[k]:.1f}" if k in row else "-" for k in KERNELS)
        print(f"| {' | '.join(map(str, key))} | {times} | {floors[key]:.1f} | {speedup} | "
              f"{vs_floor} |")


if __name__ == "__main__":
    main(sys.argv[1])
