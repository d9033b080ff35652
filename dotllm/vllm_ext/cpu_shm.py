"""Patch `cpu_shm`: several CPU workers leave no shared-memory segment behind.

With several CPU workers (`--tensor-parallel-size` or `--pipeline-parallel-size` on a CPU
box), vLLM's SHM communicator creates one segment per rank and group in /dev/shm, named
after the port of the workers' TCP store (`{port}-{group}-[{ranks}]-cpushm_{rank}`), with
O_EXCL, and never unlinks it: not when the server stops, not even on a clean exit. Every
server start left 8 MiB behind, and a later server whose store drew the same port failed to
start (`create shm in SHMManager failed. errno: 17`: seen in CI).

Here each rank unlinks its segment as soon as every rank has mapped it (after vLLM's
second barrier): the mappings live on, the name does not. A segment already under the name
when a rank is about to create it can only be a dead server's (the port is this server's
store's while it lives) and is removed first. Linux names segments under /dev/shm.

Target: `_CPUSHMDistributed._init_cpu_shm` (vLLM 0.26,
vllm/distributed/device_communicators/cpu_communicator.py).
"""

from __future__ import annotations

import contextlib
import os

from dotllm.vllm_ext.patching import replace_attribute

NAME = "cpu_shm"
SHM_DIR = "/dev/shm"


def segment_path(group_name: str, rank: int) -> str:
    """Where vLLM's SHMManager puts a rank's segment (`{name}_{rank}`, shm_open's name)."""
    return os.path.join(SHM_DIR, f"{group_name}_{rank}")


def _unlinked_after_join(stock):
    def _init_cpu_shm(self) -> int:
        path = segment_path(self.group_name, self.communicator.rank)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a dead server's
        handle = stock(self)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # every rank has mapped it
        return handle

    return _init_cpu_shm


def apply(in_launcher: bool) -> bool:
    if in_launcher:
        return False
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.distributed.device_communicators.cpu_communicator import _CPUSHMDistributed

    replace_attribute(_CPUSHMDistributed, "_init_cpu_shm", _unlinked_after_join, NAME)
    return True
