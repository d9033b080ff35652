"""Time to first token and tokens/s of constrained requests, served: DotLLM's tiers vs each
engine alone vs stock vLLM (xgrammar), on real-world schemas (JSONSchemaBench).

    python -m bench.tiers_serving [--sample N] [--engines tiered outlines llguidance stock]

Each engine gets a fresh server on the embedded model (a fresh index cache: cold). Each
unique schema is sent once (cold: nothing compiled yet), then, once the server's compiles
have finished, once more (warm); unconstrained requests on the same server give the
baseline. First one request at a time (streams: the TTFT is the constraint's own cost plus
a prefill and a step), then in batches of as many requests at once, on other schemas
(tokens/s: the batch's tokens over its wall time). A schema an engine refuses (HTTP 400)
is counted, not timed.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import openai
import torch

from bench.jsonschemabench import load, parser
from dotllm.embedded_model import NAME
from tests.conftest import DOTLLM, Server, free_port, start_server, stop_server

ENGINES = ("tiered", "outlines", "llguidance", "stock")
PROMPT = "Reply in JSON:"


@dataclass
class Timing:
    status: str  # ok | 400 | error
    ttft_s: float = 0.0
    tokens: int = 0
    decode_s: float = 0.0  # first token to last
    valid: bool | None = None  # None: cut by max_tokens


@dataclass
class Phase:
    timings: list[Timing]
    wall_s: float | None = None  # a batch: all its requests sent at once


@dataclass
class EngineRun:
    engine: str
    phases: dict[str, Phase] = field(default_factory=dict)


def start(engine: str, workdir: Path, timeout: float) -> Server:
    port, log = free_port(), workdir / f"{engine}.log"
    if engine == "stock":
        from dotllm import embedded_model

        env = {k: v for k, v in os.environ.items() if k != "DOTLLM_SERVE"}
        env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="2")
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
               str(embedded_model.build()), "--served-model-name", NAME, "--port", str(port)]
        if not torch.cuda.is_available():
            cmd += ["--dtype", "float32"]  # what `dotllm serve` picks on CPU
        return start_server(cmd, port, log, env=env)
    cmd = [str(DOTLLM), "serve", "--port", str(port), "--dotllm-constraint-engine", engine,
           "--dotllm-index-cache-dir", str(workdir / f"{engine}-indexes"),
           "--dotllm-compile-timeout", str(timeout)]
    return start_server(cmd, port, log)


def request(client: openai.OpenAI, schema: dict | None, max_tokens: int) -> Timing:
    extra = {"structured_outputs": {"json": schema}} if schema is not None else {}
    started = time.perf_counter()
    first = last = None
    text, usage, finish = "", None, None
    try:
        stream = client.completions.create(
            model=NAME, prompt=PROMPT, max_tokens=max_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body=extra)
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.text:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    text += choice.text
                finish = choice.finish_reason or finish
    except openai.BadRequestError:
        return Timing("400")
    except openai.APIError as e:  # a constraint failing in the engine, reported in the stream
        if "Invalid structured output" in str(e):
            return Timing("400")
        print(f"request failed: {e}", file=sys.stderr)
        return Timing("error")
    if first is None or usage is None:
        print(f"no tokens came back (finish_reason {finish})", file=sys.stderr)
        return Timing("error")
    valid = None
    if schema is not None and finish == "stop":
        try:
            jsonschema.validate(json.loads(text), schema)
            valid = True
        except (ValueError, jsonschema.ValidationError, jsonschema.SchemaError):
            valid = False
    return Timing("ok", first - started, usage.completion_tokens, last - first, valid)


def batch(client: openai.OpenAI, schemas: list, max_tokens: int) -> Phase:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(schemas)) as pool:
        timings = list(pool.map(lambda schema: request(client, schema, max_tokens), schemas))
    return Phase(timings, time.perf_counter() - started)


def run_engine(engine: str, schemas: list[dict], batch_schemas: list[dict], max_tokens: int,
               timeout: float, workdir: Path) -> EngineRun:
    """One after another: unconstrained and cold requests alternate, then warm ones; then
    in batches (all at once): unconstrained, cold (other schemas), warm."""
    server = start(engine, workdir, timeout)
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                           timeout=max(600.0, 4 * timeout))
    run = EngineRun(engine)

    def compiles_done(count: int) -> None:
        if engine != "stock":
            server.wait_for_compiles(timeout_s=count * timeout + 60)
            # The first request after the engine idled costs ~300 ms more on CPU, with or
            # without a constraint: not what the next phase measures.
            request(client, None, max_tokens)

    try:
        for _ in range(3):  # warm-up: the first requests of a server are slower
            request(client, None, max_tokens)
        unconstrained, cold = Phase([]), Phase([])
        for schema in schemas:
            unconstrained.timings.append(request(client, None, max_tokens))
            cold.timings.append(request(client, schema, max_tokens))
        run.phases.update(unconstrained=unconstrained, cold=cold)
        compiles_done(len(schemas))
        run.phases["warm"] = Phase([request(client, schema, max_tokens) for schema in schemas])
        run.phases["batch unconstrained"] = batch(client, [None] * len(batch_schemas),
                                                  max_tokens)
        run.phases["batch cold"] = batch(client, batch_schemas, max_tokens)
        compiles_done(len(batch_schemas))
        run.phases["batch warm"] = batch(client, batch_schemas, max_tokens)
    finally:
        stop_server(server)
    return run


def _ms(values: list[float], q: float) -> str:
    if not values:
        return "-"
    values = sorted(values)
    return f"{1000 * values[min(len(values) - 1, int(q * len(values)))]:.0f}"


def summary(run: EngineRun) -> list[dict]:
    """TTFT over the sequential unconstrained median; tokens/s: a sequential request's
    decode rate, or a batch's tokens over its wall time."""
    base_p50 = statistics.median(
        t.ttft_s for t in run.phases["unconstrained"].timings if t.status == "ok")
    rows = []
    for name, phase in run.phases.items():
        ok = [t for t in phase.timings if t.status == "ok"]
        ttft = [t.ttft_s for t in ok]
        over = [x - base_p50 for x in ttft]
        if phase.wall_s is not None:
            tokens_s = sum(t.tokens for t in ok) / phase.wall_s
        else:
            decode = [t for t in ok if t.tokens > 1 and t.decode_s > 0]
            tokens_s = (sum(t.tokens - 1 for t in decode) / sum(t.decode_s for t in decode)
                        if decode else 0.0)
        finished = [t.valid for t in ok if t.valid is not None]
        rows.append({
            "engine": run.engine, "phase": name, "answered": f"{len(ok)}/{len(phase.timings)}",
            "refused": sum(t.status == "400" for t in phase.timings),
            "errors": sum(t.status == "error" for t in phase.timings),
            "ttft_p50_ms": _ms(ttft, 0.5), "ttft_p90_ms": _ms(ttft, 0.9),
            "over_unconstrained_p50_ms": _ms(over, 0.5),
            "over_unconstrained_p90_ms": _ms(over, 0.9),
            "tokens_per_s": round(tokens_s, 1),
            "valid": f"{sum(finished)}/{len(finished)}" if "unconstrained" not in name else "-",
        })
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| engine | phase | answered | TTFT p50 | TTFT p90 | over unconstrained p50 | "
            "p90 | tokens/s | valid (finished) |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['engine']} | {r['phase']} | {r['answered']} | {r['ttft_p50_ms']} ms | "
            f"{r['ttft_p90_ms']} ms | {r['over_unconstrained_p50_ms']} ms | "
            f"{r['over_unconstrained_p90_ms']} ms | {r['tokens_per_s']} | {r['valid']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(sample=5)
    p.add_argument("--engines", nargs="*", default=list(ENGINES), choices=ENGINES)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--json", type=Path, help="also write every row here")
    args = p.parse_args(argv)
    def sample(seed: int) -> list[dict]:
        return [case.schema for subset in args.subsets
                for case in load(subset, sample=args.sample or None, seed=seed)]

    schemas, batch_schemas = sample(0), sample(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dotllm-tiers-bench-") as workdir:
        for engine in args.engines:
            run = run_engine(engine, schemas, batch_schemas, args.max_tokens, args.timeout,
                             Path(workdir))
            rows += summary(run)
            print(json.dumps(rows[-len(run.phases):]), flush=True)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
