"""Serving at equal work: the per-step cost of constrained requests against the same
server's unconstrained ones, DotLLM vs stock vLLM.

    python -m bench.serve [--engines dotllm xgrammar guidance] [--workloads free enum-array]
                          [--concurrency 16 64] [--tokens 64] [--repeats 3] [--out FILE]

Every request of every workload runs exactly --tokens decode steps on every engine (a
constrained request whose document could end sooner would compare different work): `free`
ignores EOS, `enum-array` is an array of enum strings with at least as many items as
steps (narrow masks: DotLLM's index tier once warm), `long-string` one string field that
cannot close in time (wide masks: DotLLM's llguidance tier). The per-step figure is
vLLM's own `vllm:inter_token_latency_seconds` (engine-side timestamps), read from /metrics
before and after each batch: with many streams, client-side gaps measure the API server.
Each repeat runs every workload once, in turn, on the same server; a workload's ratio is
its step time over the same repeat's `free` step time, reported as median [min-max].

Engines: `dotllm` (`dotllm serve`, with --serve-arg/--env added), or a stock backend
(`xgrammar`, `guidance`, `outlines`): vLLM's own server with DotLLM's plugin not loaded.
The model defaults to the embedded one; --model with --load-format dummy in --serve-arg
gives full-size shapes without weights.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from bench import prometheus
from tests.conftest import DOTLLM, Server, free_port, start_server, stop_server

STOCK_BACKENDS = ("xgrammar", "guidance", "outlines")
ENGINES = ("dotllm", *STOCK_BACKENDS)
WORKLOADS = ("free", "enum-array", "long-string")
PROMPT = "Reply in JSON:"
# vLLM's own plugins only: DotLLM's entry point is not even loaded in a stock server.
STOCK_PLUGINS = "lora_filesystem_resolver,lora_hf_hub_resolver"
ITL = "vllm:inter_token_latency_seconds"
TTFT = "vllm:time_to_first_token_seconds"


def workload_body(workload: str, tokens: int) -> dict:
    """The request fields that make `workload` run exactly `tokens` steps."""
    if workload == "free":
        return {"ignore_eos": True}
    if workload == "enum-array":
        schema = {"type": "array", "items": {"enum": ["alpha", "beta", "gamma", "delta"]},
                  "minItems": tokens}
    elif workload == "long-string":
        # No token of the vocabulary is 64 characters long: the string is still open.
        schema = {"type": "object", "required": ["text"], "properties": {
            "text": {"type": "string", "minLength": 64 * tokens}}}
    else:
        raise ValueError(f"unknown workload {workload!r}")
    return {"structured_outputs": {"json": schema}, "min_tokens": tokens}


@dataclass
class Batch:
    engine: str
    workload: str
    concurrency: int
    repeat: int
    wall_s: float
    tokens: list[int]
    ttft_s: list[float]  # client-side, per request
    engine_itl_s: float  # vLLM's histogram: mean step time over the batch's tokens
    engine_ttft_s: float
    errors: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens) / self.wall_s


def _histogram(samples: dict[str, float], name: str) -> tuple[float, float]:
    """(sum, count) of a histogram over all its label sets."""
    total = count = 0.0
    for key, value in samples.items():
        if key.startswith(name + "_sum"):
            total += value
        elif key.startswith(name + "_count"):
            count += value
    return total, count


def _mean_between(before: dict, after: dict, name: str) -> float:
    (s0, c0), (s1, c1) = _histogram(before, name), _histogram(after, name)
    return (s1 - s0) / (c1 - c0) if c1 > c0 else float("nan")


async def _metrics(client: httpx.AsyncClient) -> dict[str, float]:
    return prometheus.samples((await client.get("/metrics")).text)


async def _one(client: httpx.AsyncClient, model: str, body: dict, tokens: int
               ) -> tuple[int, float, str | None]:
    """Streams one completion: (tokens, client TTFT, error)."""
    payload = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 1.0,
               "stream": True, "stream_options": {"include_usage": True}, **body}
    started, first, used = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/completions", json=payload) as response:
        if response.status_code != 200:
            return 0, 0.0, f"{response.status_code}: {(await response.aread())[:200]!r}"
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return used, 0.0, str(chunk["error"])[:200]
            if chunk.get("choices") and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
    if used != tokens:
        return used, 0.0, f"ran {used} steps, not {tokens}"
    return used, (first or started) - started, None


async def run_batch(base_url: str, model: str, engine: str, workload: str, concurrency: int,
                    tokens: int, repeat: int) -> Batch:
    body = workload_body(workload, tokens)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=1800, limits=limits) as client:
        before = await _metrics(client)
        started = time.perf_counter()
        results = await asyncio.gather(
            *(_one(client, model, body, tokens) for _ in range(concurrency)))
        wall = time.perf_counter() - started
        after = await _metrics(client)
    return Batch(engine, workload, concurrency, repeat, wall,
                 tokens=[r[0] for r in results], ttft_s=[r[1] for r in results],
                 engine_itl_s=_mean_between(before, after, ITL),
                 engine_ttft_s=_mean_between(before, after, TTFT),
                 errors=[r[2] for r in results if r[2]])


def start_engine(engine: str, model: str | None, serve_args: list[str], env: dict[str, str],
                 workdir: Path, extra_plugins: tuple[str, ...] = ()) -> Server:
    """A fresh server; a stock one loads vLLM's own plugins and `extra_plugins` only."""
    port, log = free_port(), workdir / f"{engine}.log"
    environ = {**os.environ, **env}
    if engine == "dotllm":
        cmd = [str(DOTLLM), "serve", *([model] if model else []), "--port", str(port),
               "--dotllm-index-cache-dir", str(workdir / "indexes")]
        server = start_server([*cmd, *serve_args], port, log, env=environ)
    else:
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
        server = start_server([*cmd, *serve_args], port, log, env=environ)
    server.index_cache_dir = workdir / "indexes"
    return server


async def _served_model(base_url: str) -> str:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        return (await client.get("/v1/models")).json()["data"][0]["id"]


async def _warm(base_url: str, model: str, workloads: list[str], tokens: int) -> None:
    """One request per workload, then until the server's compiles are over (DotLLM's
    index tier is what a warm server serves)."""
    for workload in workloads:
        async with httpx.AsyncClient(base_url=base_url, timeout=1800) as client:
            await _one(client, model, workload_body(workload, tokens), tokens)
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        deadline = time.monotonic() + 600
        while prometheus.compiling(await _metrics(client)) and time.monotonic() < deadline:
            await asyncio.sleep(1)


def measure(base_url: str, engine: str, workloads: list[str], concurrency: list[int],
            tokens: int, repeats: int, out) -> list[Batch]:
    model = asyncio.run(_served_model(base_url))
    asyncio.run(_warm(base_url, model, workloads, tokens))
    batches = []
    for c in concurrency:
        for repeat in range(repeats):
            for workload in workloads:
                batch = asyncio.run(run_batch(base_url, model, engine, workload, c, tokens,
                                              repeat))
                batches.append(batch)
                out.write(json.dumps(asdict(batch)) + "\n")
                out.flush()
                print(f"{engine} {workload} x{c} #{repeat}: step "
                      f"{batch.engine_itl_s * 1e3:.2f} ms, {batch.tokens_per_s:,.0f} tok/s"
                      + (f", {len(batch.errors)} errors: {batch.errors[0]}"
                         if batch.errors else ""), file=sys.stderr, flush=True)
    return batches


def spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "-"
    v = sorted(x * scale for x in values)
    return f"{statistics.median(v):.{digits}f} [{v[0]:.{digits}f}-{v[-1]:.{digits}f}]"


def summary(batches: list[Batch]) -> str:
    """A markdown table: per engine, workload and concurrency, the engine's step time and
    its ratio to the same repeat's unconstrained step (median [min-max] over repeats)."""
    free = {(b.engine, b.concurrency, b.repeat): b for b in batches if b.workload == "free"}
    rows = ["| engine | workload | concurrency | step ms | x free | tok/s | client TTFT p50 s "
            "| errors |", "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[Batch]] = {}
    for b in batches:
        groups.setdefault((b.engine, b.workload, b.concurrency), []).append(b)
    for (engine, workload, c), group in groups.items():
        ratios = [b.engine_itl_s / free[engine, c, b.repeat].engine_itl_s for b in group
                  if (engine, c, b.repeat) in free]
        ttfts = [statistics.median(b.ttft_s) for b in group]
        rows.append(
            f"| {engine} | {workload} | {c} | {spread([b.engine_itl_s for b in group], 1e3)} "
            f"| {spread(ratios)} | {spread([b.tokens_per_s for b in group], digits=0)} "
            f"| {spread(ttfts)} | {sum(len(b.errors) for b in group)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=["dotllm"])
    parser.add_argument("--url", help="measure a running server instead (named by --engines)")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS,
                        default=["free", "enum-array"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[16])
    parser.add_argument("--tokens", type=int, default=64, help="decode steps per request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", help="a model directory or Hub id (default: embedded)")
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="an option for every started server (repeat; '--x=y' form)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for every started server (repeat)")
    parser.add_argument("--out", type=Path, default=Path("serve-results.jsonl"))
    args = parser.parse_args(argv)
    if "free" not in args.workloads:
        parser.error("--workloads needs free: ratios are against it")
    env = dict(item.split("=", 1) for item in args.env)
    batches = []
    with open(args.out, "a") as out, tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines:
            if args.url:
                batches += measure(args.url, engine, args.workloads, args.concurrency,
                                   args.tokens, args.repeats, out)
                continue
            server = start_engine(engine, args.model, args.serve_arg, env,
                                  Path(tempfile.mkdtemp(dir=tmp)))
            try:
                batches += measure(server.url, engine, args.workloads, args.concurrency,
                                   args.tokens, args.repeats, out)
            finally:
                stop_server(server)
    print(summary(batches))
    return 1 if any(b.errors for b in batches) else 0


if __name__ == "__main__":
    raise SystemExit(main())
