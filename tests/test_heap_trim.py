"""heap_trim: freed heap that glibc keeps is handed back, by one thread per process.

Each check runs in a fresh interpreter: the test process's own heap is not the subject.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dotllm.vllm_ext import heap_trim

pytestmark = pytest.mark.skipif(heap_trim._malloc_trim() is None, reason="needs glibc")

# What vLLM's CPU worker does over varied batches, in miniature: a large block freed
# raises glibc's mmap threshold, so later blocks of that size come from the heap; all but
# the newest are freed, and the pages stay with the process until something trims.
RETAINED = """
import ctypes, json, os
from dotllm.vllm_ext import heap_trim

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20

MIB = 1 << 20
libc.free(libc.malloc(8 * MIB))
blocks = [libc.malloc(MIB) for _ in range(300)]
for block in blocks:
    ctypes.memset(block, 1, MIB)
for block in blocks[:-1]:
    libc.free(block)
kept = rss_mib()
heap_trim._malloc_trim()(0)
print(json.dumps({"kept": kept, "trimmed": rss_mib()}))
"""

THREADS = """
import json, os, threading
from dotllm.vllm_ext import heap_trim

def trimmers():
    return sum(t.name == "dotllm-heap-trim" for t in threading.enumerate())

applied = [heap_trim.apply(False), heap_trim.apply(False)]
read, write = os.pipe()
if (pid := os.fork()) == 0:  # a forked child has no thread until the plugin runs again
    os.write(write, json.dumps([trimmers(), heap_trim.apply(False), trimmers()]).encode())
    os._exit(0)
os.waitpid(pid, 0)
print(json.dumps({"applied": applied, "trimmers": trimmers(),
                  "child": json.loads(os.read(read, 1000))}))
"""

# A process busy for a while, then at rest: only the rest is trimmed.
AT_REST = """
import json, threading, time
from dotllm.vllm_ext import heap_trim

calls = []
threading.Thread(target=heap_trim._trim_forever, daemon=True,
                 args=(lambda pad: calls.append(pad), 0.2)).start()
end = time.monotonic() + 1.5
while time.monotonic() < end:
    pass
busy = len(calls)
time.sleep(1.5)
print(json.dumps({"busy": busy, "at_rest": len(calls) - busy}))
"""


def run(script: str, **environ: str) -> dict:
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, env={**os.environ, **environ})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_malloc_trim_returns_the_heap_glibc_keeps():
    rss = run(RETAINED)
    assert rss["kept"] - rss["trimmed"] > 200, rss


def test_one_trimming_thread_per_process_also_after_fork():
    out = run(THREADS)
    assert out["applied"] == [True, True] and out["trimmers"] == 1
    assert out["child"] == [0, True, 1]


def test_an_interval_of_zero_trims_nothing():
    out = run(THREADS, DOTLLM_HEAP_TRIM_S="0")
    assert out["applied"] == [False, False] and out["trimmers"] == 0


def test_a_busy_process_is_not_trimmed_one_at_rest_is():
    out = run(AT_REST)
    assert out["busy"] == 0 and out["at_rest"] >= 3, out
