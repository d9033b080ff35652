"""How long a compiled index takes to reach the engine from its compile worker.

    python -m bench.compile_transfer [--mib 38] [--repeats 5]

A worker process hands N MiB to its parent either through the connection (the bytes
themselves) or as an in-memory file whose descriptor crosses it (dotllm.compiler.pool),
while the parent is idle or has a busy Python thread, as the engine core's step loop is.
Each figure is from the moment the parent asks to the moment it holds all the bytes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import threading
import time
from multiprocessing import reduction

from dotllm.compiler.pool import in_memory_file, mapped_file


def _worker(conn, size: int) -> None:
    data = os.urandom(size)
    while (how := conn.recv()) is not None:
        if how == "connection":
            conn.send(("ok", data))
            continue
        fd = in_memory_file(data)
        conn.send(("ok-fd", size))
        reduction.send_handle(conn, fd, os.getppid())
        os.close(fd)


def _receive(conn, how: str) -> int:
    conn.send(how)
    reply = conn.recv()
    if reply[0] == "ok-fd":
        return len(mapped_file(reduction.recv_handle(conn), reply[1])[:])
    return len(reply[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=38)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe()
    worker = ctx.Process(target=_worker, args=(child, args.mib << 20), daemon=True)
    worker.start()
    busy = threading.Event()

    def spin() -> None:
        while True:
            busy.wait()
            for _ in range(10_000):
                pass

    threading.Thread(target=spin, daemon=True).start()
    print(f"| {args.mib} MiB | parent idle, s | busy Python thread beside, s |")
    print("|---|---|---|")
    for how in ("connection", "in-memory file"):
        row = []
        for beside in (False, True):
            busy.set() if beside else busy.clear()
            times = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                assert _receive(conn, how) == args.mib << 20
                times.append(time.perf_counter() - started)
            row.append(f"{statistics.median(times):.3f} [{min(times):.3f}-{max(times):.3f}]")
        print(f"| {how} | {row[0]} | {row[1]} |")
    busy.clear()
    conn.send(None)
    worker.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
