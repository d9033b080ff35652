"""The `cpu_shm` patch: vLLM's CPU SHM communicator, for real between two processes, leaves
no segment in /dev/shm and starts over a dead server's segment of the same name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

from tests.conftest import cpu_shm_communicator

pytestmark = [
    pytest.mark.skipif(not os.path.isdir("/dev/shm") or torch.cuda.is_available(),
                       reason="vLLM's CPU communicator (CPU vLLM, Linux)"),
    pytest.mark.skipif(not torch.cuda.is_available() and not cpu_shm_communicator(),
                       reason="vLLM's CPU kernels for this CPU have no SHM communicator"),
]

# One rank of two: vLLM's own communicator over a gloo group, as a CPU worker makes it.
SCRIPT = """
import json, os, sys
import torch, torch.distributed as dist
from vllm.platforms.cpu import CpuPlatform
CpuPlatform.import_kernels()  # the SHM ops, built for this CPU (AVX2 or AVX-512)
from vllm.distributed.device_communicators.cpu_communicator import (
    CpuCommunicator, _CPUSHMDistributed)
from dotllm.vllm_ext import cpu_shm

ident, patched, rank, store = sys.argv[1], sys.argv[2] == "patched", int(sys.argv[3]), sys.argv[4]
if patched:
    assert cpu_shm.apply(in_launcher=False)
os.environ["VLLM_DIST_IDENT"] = ident  # what a CPU worker sets: its store's port
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
group = dist.new_group([0, 1], backend="gloo")
try:
    comm = CpuCommunicator(cpu_group=group, device=torch.device("cpu"), device_group=group,
                           unique_name="tp:0")
except RuntimeError as error:
    print(json.dumps({"error": str(error)}), flush=True)
    os._exit(0)
x = torch.arange(8, dtype=torch.float32) * (rank + 1)
comm.all_reduce(x)  # through the segments, mapped, their names gone
dist.barrier(group)  # both ranks are done before either looks
shm = isinstance(comm.dist_module, _CPUSHMDistributed)
print(json.dumps({"shm": shm, "sum": float(x.sum()),
                  "left": sorted(f for f in os.listdir("/dev/shm") if f.startswith(ident))}),
      flush=True)
os._exit(0)  # as a stopped worker ends: no C++ static destructors (they would unlink)
"""


def _run(ident: str, patched: bool, tmp_path) -> list[dict]:
    store = tempfile.mktemp(dir=tmp_path)  # a fresh store for each pair
    ranks = [subprocess.Popen([sys.executable, "-c", SCRIPT, ident,
                               "patched" if patched else "stock", str(rank), str(store)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outs = []
    try:
        for rank in ranks:
            stdout, stderr = rank.communicate(timeout=120)
            assert rank.returncode == 0, stderr[-3000:]
            outs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for rank in ranks:  # one that failed leaves the other waiting at a barrier
            rank.kill()
            rank.wait()
    return outs


@pytest.fixture
def ident():
    ident = f"dotllm-test-{os.getpid()}"
    yield ident
    for name in os.listdir("/dev/shm"):
        if name.startswith(ident):
            os.unlink(os.path.join("/dev/shm", name))


SEGMENTS = ["{ident}-tp:0-[0-1]-cpushm_0", "{ident}-tp:0-[0-1]-cpushm_1"]


def test_stock_vllm_leaves_its_segments_and_trips_over_them(ident, tmp_path):
    # What the patch is for: the segments outlive the processes, and the next pair fails.
    segments = [s.format(ident=ident) for s in SEGMENTS]
    assert [out["left"] for out in _run(ident, False, tmp_path)] == [segments, segments]
    outs = _run(ident, False, tmp_path)
    assert all("create shm in SHMManager failed. errno: 17" in out.get("error", "")
               for out in outs), outs


def test_the_segments_are_gone_once_mapped_and_a_dead_servers_are_replaced(ident, tmp_path):
    for segment in SEGMENTS:  # a dead server's, under the names these ranks will use
        with open(os.path.join("/dev/shm", segment.format(ident=ident)), "wb") as f:
            f.write(b"\x07" * 4096)
    outs = _run(ident, True, tmp_path)
    assert outs == [{"shm": True, "sum": 84.0, "left": []}] * 2  # 3 * (0 + ... + 7)
