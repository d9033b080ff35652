"""Patch `heap_trim`: every process of the server hands its freed heap back to the system.

Measured on CPU (bench/RESULTS.md, "Hostile load"): vLLM's model worker grew by hundreds
of MiB over rounds of varied batches and never gave it back. Not a leak: glibc keeps freed
blocks in its arenas (a freed large block raises its mmap threshold, and later blocks of
that size come from arenas that fragment). Pinning the threshold stops the growth but
costs 20-40 % of a CPU step (every large tensor is then a fresh mmap). `malloc_trim(0)`
returns every free page of every arena instead. A thread here calls it when the process
has been at rest for --dotllm-heap-trim-s seconds (under a tenth of a core): under load the
freed heap is reused at once, and a trim would only cost the steps that fault it back in.
A system without glibc gets nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
import time

from dotllm.settings import Settings

NAME = "heap_trim"
AT_REST = 0.1  # share of one core below which a process counts as at rest

_started_in: int | None = None  # the pid whose thread runs (a forked child has none)


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


def _trim_forever(malloc_trim, interval_s: float) -> None:
    while True:
        busy_from = time.process_time()
        time.sleep(interval_s)
        if time.process_time() - busy_from < AT_REST * interval_s:
            malloc_trim(0)


def apply(in_launcher: bool) -> bool:
    global _started_in
    malloc_trim, interval_s = _malloc_trim(), Settings.from_environ().heap_trim_s
    if malloc_trim is None or interval_s <= 0:
        return False
    if _started_in != os.getpid():
        _started_in = os.getpid()
        threading.Thread(target=_trim_forever, args=(malloc_trim, interval_s),
                         name="dotllm-heap-trim", daemon=True).start()
    return True
