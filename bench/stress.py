"""Stress: many unique schemas at once, clients that go away mid-stream, and a compile
worker killed mid-load, against one `dotllm serve` on loopback.

    python -m bench.stress [--schemas 256] [--disconnects 50] [--rounds 1] [--url URL --pid PID]

Without --url it starts `dotllm serve` on the embedded model. Afterwards: no 5xx, every
answer that finished by itself validates, and once the compiles it started are over the
server is back to its idle state: as many compile workers as before (or fewer), the
pool's queue empty, and its memory (every process of the server) near its idle level
(measured after one constrained request has started the compile workers) plus what the
memory cache of compiled constraints took in (`dotllm_constraint_cache_bytes{level="memory"}`,
bounded by --dotllm-index-cache-memory-mib).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import psutil

from bench import prometheus
from dotllm.compiler.validation import OutputValidator

MODEL = "tiny-llama-tekken"


def schema_for(i: int) -> dict:
    """A small schema of its own for each request (unique: a compile each)."""
    return {"type": "object", "required": [f"field_{i}", "tag"], "properties": {
        f"field_{i}": {"type": "integer"}, "tag": {"enum": ["red", "green"]},
        "note": {"type": "string", "maxLength": 6}}}


@dataclass
class StressResult:
    statuses: Counter = field(default_factory=Counter)
    finished: int = 0
    invalid: list[str] = field(default_factory=list)
    disconnected: int = 0
    killed_workers: int = 0
    idle_before: dict = field(default_factory=dict)
    idle_after: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)


def _engine_cores(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True)
            if "EngineCore" in p.name()]


def compile_workers(pid: int) -> list[psutil.Process]:
    workers = []
    for engine in _engine_cores(pid):
        for p in engine.children():
            with contextlib.suppress(psutil.Error):  # gone, or a zombie not yet reaped
                if p.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(p.cmdline()):
                    workers.append(p)
    return workers


def process_rss_mib(pid: int) -> dict[str, int]:
    """Each process of the server by what it is (its title, "compile worker" for the
    pool's), with its pid: which one keeps what a load left behind."""
    root = psutil.Process(pid)
    workers = {p.pid for p in compile_workers(pid)}
    rss = {}
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            name = "compile worker" if p.pid in workers else p.name()
            rss[f"{name} {p.pid}"] = round(p.memory_info().rss / 2**20)
    return rss


async def _metrics(client: httpx.AsyncClient) -> dict[str, float]:
    return prometheus.samples((await client.get("/metrics")).text)


async def _idle(client: httpx.AsyncClient, pid: int, timeout_s: float) -> dict:
    """Wait for the pool to finish what it started, then describe the server at rest."""
    deadline = time.monotonic() + timeout_s
    while prometheus.compiling(m := await _metrics(client)):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(1)
    processes = process_rss_mib(pid)
    return {"compile_workers": len(compile_workers(pid)),
            "rss_mib": sum(processes.values()), "rss_by_process_mib": processes,
            "cache_mib": round(m.get('dotllm_constraint_cache_bytes{level="memory"}', 0) / 2**20),
            "queue": m.get("dotllm_constraint_pool_queue_length", 0),
            "compiling": prometheus.compiling(m)}


async def _ask(client: httpx.AsyncClient, i: int, result: StressResult) -> None:
    schema = schema_for(i)
    try:
        reply = await client.post("/v1/completions", json={
            "model": MODEL, "prompt": "JSON:", "max_tokens": 48, "seed": i,
            "structured_outputs": {"json": schema}})
    except httpx.HTTPError as e:
        result.statuses[f"transport: {type(e).__name__}"] += 1
        return
    result.statuses[reply.status_code] += 1
    if reply.status_code != 200:
        return
    choice = reply.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        result.finished += 1
        if (failure := OutputValidator(schema).check_text(choice["text"])) is not None:
            result.invalid.append(f"{choice['text'][:200]!r}: {failure}")


async def _go_away(client: httpx.AsyncClient, i: int, result: StressResult) -> None:
    """A streamed request whose client leaves after the first chunk."""
    body = {"model": MODEL, "prompt": "JSON:", "max_tokens": 200, "stream": True,
            "structured_outputs": {"json": schema_for(100_000 + i)}}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as reply:
            result.statuses[reply.status_code] += 1
            async for _ in reply.aiter_lines():
                break
        result.disconnected += 1
    except httpx.HTTPError as e:
        result.statuses[f"transport: {type(e).__name__}"] += 1


async def _kill_a_worker(pid: int, after_s: float, result: StressResult) -> None:
    await asyncio.sleep(after_s)
    for worker in compile_workers(pid)[:1]:
        worker.send_signal(signal.SIGKILL)
        result.killed_workers += 1


async def run(base_url: str, pid: int, schemas: int = 256, disconnects: int = 50,
              kill_after_s: float = 2.0, settle_s: float = 600, first: int = 0
              ) -> StressResult:
    """One round; `first` numbers its schemas (rounds on one server: none cached)."""
    result = StressResult()
    limits = httpx.Limits(max_connections=schemas + disconnects + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        await _ask(client, -1, StressResult())  # its compile starts the pool's workers
        result.idle_before = await _idle(client, pid, settle_s)
        started = time.monotonic()
        await asyncio.gather(
            *(_ask(client, first + i, result) for i in range(schemas)),
            *(_go_away(client, first + i, result) for i in range(disconnects)),
            _kill_a_worker(pid, kill_after_s, result))
        result.seconds = time.monotonic() - started
        result.idle_after = await _idle(client, pid, settle_s)
    return result


def unexplained_growth_mib(result: StressResult) -> float:
    """Memory the server kept after the load beyond what its index cache took in."""
    before, after = result.idle_before, result.idle_after
    return (after["rss_mib"] - before["rss_mib"]) - (after["cache_mib"] - before["cache_mib"])


def report(result: StressResult) -> dict:
    return {"statuses": {str(k): v for k, v in result.statuses.items()},
            "unexplained_growth_mib": unexplained_growth_mib(result),
            "server_errors": result.server_errors, "finished": result.finished,
            "invalid": len(result.invalid), "disconnected": result.disconnected,
            "killed_workers": result.killed_workers, "seconds": round(result.seconds, 1),
            "idle_before": result.idle_before, "idle_after": result.idle_after}


def _start_server(port: int) -> subprocess.Popen:
    dotllm = os.path.join(os.path.dirname(sys.executable), "dotllm")
    process = subprocess.Popen([dotllm, "serve", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    os.killpg(process.pid, signal.SIGKILL)
    raise SystemExit("dotllm serve did not start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemas", type=int, default=256)
    parser.add_argument("--disconnects", type=int, default=50)
    parser.add_argument("--url", help="a running server (with --pid, its process)")
    parser.add_argument("--pid", type=int)
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds on the same server, new schemas each (memory kept or not)")
    parser.add_argument("--first-round", type=int, default=1,
                        help="the first round's number (another run on the same server)")
    args = parser.parse_args(argv)
    process = None
    if args.url is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        process = _start_server(port)
        args.url, args.pid = f"http://127.0.0.1:{port}", process.pid
    failed = False
    try:
        for round_ in range(args.first_round, args.first_round + args.rounds):
            result = asyncio.run(run(args.url, args.pid, args.schemas, args.disconnects,
                                     first=(round_ - 1) * 1_000_000))
            print(json.dumps({"round": round_, **report(result)}), flush=True)
            for line in result.invalid[:5]:
                print("  INVALID", line)
            failed |= bool(result.server_errors or result.invalid)
    finally:
        if process is not None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
