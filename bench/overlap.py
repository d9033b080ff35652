"""Time to first token when a constraint must compile: behind the prompt's prefill, or
before it (issue 14).

    python -m bench.overlap [--servers waiting waiting-off xgrammar] [--prompt-tokens 1000 3500]
                            [--repeats 3] [--regex-length 300] [--model DIR --serve-arg ...]

Servers: `waiting` is `dotllm serve --dotllm-constraint-engine outlines` (a request waits
for its index: the case the overlap is for), `waiting-off` the same with
--dotllm-compile-overlap off (vLLM's way: the whole request waits), `tiered` DotLLM's
default (llguidance at once, or, for a prompt longer than --max-num-batched-tokens, the
index if it comes within the prefill: the last column; `tiered-off` without the overlap:
llguidance at once whatever the prompt), `xgrammar` stock vLLM. Each
repeat, per prompt length: an unconstrained request (its TTFT: the prefill and one step),
then a request with a regex no request used before (`[a-z]{N}`, N new each time: a
compile of its own) and a prompt of its own (no prefix cache), max_tokens 1. DotLLM's
compile time is read from its `dotllm_constraint_compile_seconds` around the request.
The target: TTFT = max(compile, prefill) + one step, not their sum.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench import prometheus, serve, servers

SERVERS = {
    "waiting": ("dotllm", ["--dotllm-constraint-engine", "outlines"]),
    "waiting-off": ("dotllm", ["--dotllm-constraint-engine", "outlines",
                               "--dotllm-compile-overlap", "off"]),
    "tiered": ("dotllm", []),
    "tiered-off": ("dotllm", ["--dotllm-compile-overlap", "off"]),
    "xgrammar": ("xgrammar", []),
}
COMPILE = "dotllm_constraint_compile_seconds_sum"
WAITS = "dotllm_constraint_prefill_waits_total"
RNG = np.random.default_rng()


def prompt(tokens: int) -> list[int]:
    """`tokens` token ids no other prompt shares (no prefix cache hit)."""
    return [int(x) for x in RNG.integers(1000, 30000, size=tokens)]


async def ttft(client: httpx.AsyncClient, model: str, ids: list[int], regex: str | None
               ) -> float:
    body = {"model": model, "prompt": ids, "max_tokens": 1, "stream": True}
    if regex is not None:
        body["structured_outputs"] = {"regex": regex}
    started = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if line.startswith("data: ") and '"text"' in line:
                return time.perf_counter() - started
    raise RuntimeError("no token came back")


def first_token_on(before: dict[str, float], after: dict[str, float]) -> str | None:
    """What served the tiered engine's first token when it waited behind the prefill:
    its index, or llguidance (the prefill ended first); None where it did not wait."""
    for outcome in ("index", "llguidance"):
        name = f'{WAITS}{{outcome="{outcome}"}}'
        if after.get(name, 0) > before.get(name, 0):
            return outcome
    return None


async def measure(url: str, server: str, lengths: list[int], repeats: int,
                  regex_length: int, out) -> list[dict]:
    rows = []
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        await ttft(client, model, prompt(64), None)  # warm
        n = regex_length
        for repeat in range(repeats):
            for length in lengths:
                free = await ttft(client, model, prompt(length), None)
                n += 1
                before = prometheus.samples((await client.get("/metrics")).text)
                constrained = await ttft(client, model, prompt(length), f"[a-z]{{{n}}}")
                await asyncio.sleep(1.0)  # the compile's histogram is written at its end
                after = prometheus.samples((await client.get("/metrics")).text)
                compile_s = after.get(COMPILE, 0) - before.get(COMPILE, 0)
                row = {"server": server, "prompt_tokens": length, "repeat": repeat,
                       "free_ttft_s": free, "ttft_s": constrained,
                       "compile_s": compile_s if COMPILE in after else None,
                       "first_token_on": first_token_on(before, after)}
                rows.append(row)
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def summary(rows: list[dict]) -> str:
    """Medians [min-max] over repeats; `x max` is TTFT over max(compile, free TTFT), `x sum`
    over compile + free TTFT (1.0: all of the compile hidden / none of it)."""
    lines = ["| server | prompt tokens | free TTFT s | compile s | TTFT s | x max(compile, free) "
             "| x (compile + free) | first token on the index |",
             "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["server"], r["prompt_tokens"]), []).append(r)

    for (server, length), group in groups.items():
        timed = [r for r in group if r["compile_s"]]
        over_max = [r["ttft_s"] / max(r["compile_s"], r["free_ttft_s"]) for r in timed]
        over_sum = [r["ttft_s"] / (r["compile_s"] + r["free_ttft_s"]) for r in timed]
        lines.append(
            f"| {server} | {length} | {serve.spread([r['free_ttft_s'] for r in group])} "
            f"| {serve.spread([r['compile_s'] for r in timed])} "
            f"| {serve.spread([r['ttft_s'] for r in group])} "
            f"| {serve.spread(over_max)} | {serve.spread(over_sum)} "
            f"| {on_index(group)} |")
    return "\n".join(lines)


def on_index(group: list[dict]) -> str:
    """How many of the requests that waited behind their prefill got their index in time."""
    waited = [r["first_token_on"] for r in group if r.get("first_token_on")]
    return f"{waited.count('index')} of {len(waited)}" if waited else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", nargs="+", choices=list(SERVERS),
                        default=["waiting", "waiting-off", "xgrammar"])
    parser.add_argument("--prompt-tokens", nargs="+", type=int, default=[1000, 3500])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--regex-length", type=int, default=300,
                        help="N of the first [a-z]{N} (~2 s to compile on 2 CPU cores)")
    parser.add_argument("--model")
    parser.add_argument("--serve-arg", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("overlap-results.jsonl"))
    args = parser.parse_args(argv)
    rows = []
    with open(args.out, "a") as out, tempfile.TemporaryDirectory() as tmp:
        for name in args.servers:
            engine, extra = SERVERS[name]
            server = servers.start(engine, args.model, [*extra, *args.serve_arg], {},
                                   Path(tempfile.mkdtemp(dir=tmp)))
            try:
                rows += asyncio.run(measure(server.url, name, args.prompt_tokens,
                                            args.repeats, args.regex_length, out))
            finally:
                servers.stop_server(server)
                # Kept beside the results: a server that died says why only there.
                shutil.copy(server.log, args.out.parent / f"{args.out.stem}-{name}.log")
    print(summary(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
