"""The servers a benchmark compares, each started fresh (a fresh index cache: cold):
`dotllm serve` (its default tiers, or one constraint engine alone) and stock vLLM with one
of its own structured-output backends, DotLLM's plugin not even loaded."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import httpx

from bench import prometheus
from tests.conftest import DOTLLM, Server, free_port, start_server, stop_server

STOCK_BACKENDS = ("xgrammar", "guidance", "outlines")
# DotLLM's own variants: its defaults, the index tier alone, llguidance alone, forced
# drafts, device states given (512 MiB: the GPU default, off on CPU) and none (a step's
# index rows as table rows the host picks, the default before device states).
DOTLLM_ENGINES = {"dotllm": [],
                  "dotllm-index": ["--dotllm-constraint-engine", "outlines"],
                  "dotllm-llguidance": ["--dotllm-constraint-engine", "llguidance"],
                  "dotllm-drafts": ["--dotllm-forced-drafts", "4"],
                  "dotllm-device": ["--dotllm-device-states-mib", "512"],
                  "dotllm-rows": ["--dotllm-device-states-mib", "0"]}
ENGINES = (*DOTLLM_ENGINES, *STOCK_BACKENDS)
# vLLM's own plugins only: DotLLM's entry point is not even loaded in a stock server.
STOCK_PLUGINS = "lora_filesystem_resolver,lora_hf_hub_resolver"
# Stock vLLM 0.26 honours disable_any_whitespace only server-wide (DotLLM: per request).
STOCK_COMPACT = "--structured-outputs-config.disable_any_whitespace=true"

__all__ = ["ENGINES", "STOCK_BACKENDS", "Server", "compiles_done", "served_model", "start",
           "stop_server"]


def start(engine: str, model: str | None, serve_args: list[str], env: dict[str, str],
          workdir: Path, extra_plugins: tuple[str, ...] = (), compact: bool = False
          ) -> Server:
    """A fresh server; a stock one loads vLLM's own plugins and `extra_plugins` only, and
    with `compact` writes no free whitespace in any JSON it constrains."""
    port, log = free_port(), workdir / f"{engine}{'-compact' if compact else ''}.log"
    environ = {**os.environ, **env}
    if engine in DOTLLM_ENGINES:
        cmd = [str(DOTLLM), "serve", *([model] if model else []), "--port", str(port),
               "--dotllm-index-cache-dir", str(workdir / "indexes"), *DOTLLM_ENGINES[engine]]
        server = start_server([*cmd, *serve_args], port, log, env=environ)
    elif engine in STOCK_BACKENDS:
        from dotllm import embedded_model, serve_defaults

        on_gpu = serve_defaults.has_gpu()
        serve_defaults.apply_environment(environ, on_gpu)
        environ.pop("DOTLLM_SERVE", None)
        environ["VLLM_PLUGINS"] = ",".join((STOCK_PLUGINS, *extra_plugins))
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--port", str(port),
               "--model", model or str(embedded_model.build()),
               "--structured-outputs-config.backend", engine]
        if model is None:
            cmd += ["--served-model-name", embedded_model.NAME]
        for option, value in serve_defaults.option_defaults(on_gpu).items():
            cmd += [f"--{option.replace('_', '-')}", value]
        # DotLLM's executor default, so both compare on equal flags (one GPU: the bench's).
        backend = serve_defaults.executor_backend(on_gpu, None, 1)
        if backend and not any(a.startswith("--distributed-executor-backend")
                               for a in serve_args):
            cmd += ["--distributed-executor-backend", backend]
        if compact:
            cmd.append(STOCK_COMPACT)
        server = start_server([*cmd, *serve_args], port, log, env=environ)
    else:
        raise ValueError(f"unknown engine {engine!r}: one of {', '.join(ENGINES)}")
    server.index_cache_dir = workdir / "indexes"
    return server


async def served_model(base_url: str) -> str:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        return (await client.get("/v1/models")).json()["data"][0]["id"]


async def compiles_done(base_url: str, timeout_s: float = 600) -> None:
    """Until the server's compiles are over (DotLLM's index tier is what a warm server
    serves); at once on a server without DotLLM's metrics."""
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and prometheus.compiling(
                prometheus.samples((await client.get("/metrics")).text)):
            await asyncio.sleep(1)
