"""Time to first token and tokens/s of constrained requests, served: DotLLM's tiers vs each
engine alone vs stock vLLM (xgrammar), on real-world schemas (JSONSchemaBench).

    python -m bench.tiers_serving [--sample N] [--engines tiered outlines llguidance stock]

Each engine gets a fresh server on the embedded model (a fresh index cache: cold). Each
unique schema is sent once (cold: nothing compiled yet), then, once the server's compiles
have finished, once more (warm); unconstrained requests on the same server give the
baseline. Requests are sequential streams, so the TTFT is the constraint's own cost plus a
prefill and a step. A schema an engine refuses (HTTP 400) is counted, not timed.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import openai

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
class EngineRun:
    engine: str
    baseline: list[Timing] = field(default_factory=list)
    cold: list[Timing] = field(default_factory=list)
    warm: list[Timing] = field(default_factory=list)


def start(engine: str, workdir: Path, timeout: float) -> Server:
    port, log = free_port(), workdir / f"{engine}.log"
    if engine == "stock":
        from dotllm import embedded_model

        env = {k: v for k, v in os.environ.items() if k != "DOTLLM_SERVE"}
        env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="2")
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
               str(embedded_model.build()), "--served-model-name", NAME, "--dtype", "float32",
               "--port", str(port)]
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


def run_engine(engine: str, schemas: list[dict], max_tokens: int, timeout: float,
               workdir: Path) -> EngineRun:
    server = start(engine, workdir, timeout)
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                           timeout=max(600.0, 4 * timeout))
    result = EngineRun(engine)
    try:
        for _ in range(3):  # warm-up: the first requests of a server are slower
            request(client, None, max_tokens)
        for schema in schemas:
            result.baseline.append(request(client, None, max_tokens))
            result.cold.append(request(client, schema, max_tokens))
        if engine != "stock":
            server.wait_for_compiles(timeout_s=len(schemas) * timeout + 60)
        result.warm = [request(client, schema, max_tokens) for schema in schemas]
    finally:
        stop_server(server)
    return result


def _ms(values: list[float], q: float) -> str:
    if not values:
        return "-"
    values = sorted(values)
    return f"{1000 * values[min(len(values) - 1, int(q * len(values)))]:.0f}"


def summary(run: EngineRun) -> list[dict]:
    base = [t.ttft_s for t in run.baseline if t.status == "ok"]
    base_p50 = statistics.median(base)
    rows = []
    for phase, timings in (("unconstrained", run.baseline), ("cold", run.cold),
                           ("warm", run.warm)):
        ok = [t for t in timings if t.status == "ok"]
        ttft = [t.ttft_s for t in ok]
        over = [x - base_p50 for x in ttft]
        decode = [t for t in ok if t.tokens > 1 and t.decode_s > 0]
        tokens_s = (sum(t.tokens - 1 for t in decode) / sum(t.decode_s for t in decode)
                    if decode else 0.0)
        finished = [t.valid for t in ok if t.valid is not None]
        rows.append({
            "engine": run.engine, "phase": phase, "answered": f"{len(ok)}/{len(timings)}",
            "refused": sum(t.status == "400" for t in timings),
            "errors": sum(t.status == "error" for t in timings),
            "ttft_p50_ms": _ms(ttft, 0.5), "ttft_p90_ms": _ms(ttft, 0.9),
            "over_unconstrained_p50_ms": _ms(over, 0.5),
            "over_unconstrained_p90_ms": _ms(over, 0.9),
            "tokens_per_s": round(tokens_s, 1),
            "valid": f"{sum(finished)}/{len(finished)}" if phase != "unconstrained" else "-",
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
    schemas = [case.schema for subset in args.subsets
               for case in load(subset, sample=args.sample or None)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="dotllm-tiers-bench-") as workdir:
        for engine in args.engines:
            run = run_engine(engine, schemas, args.max_tokens, args.timeout, Path(workdir))
            rows += summary(run)
            print(json.dumps(rows[-3:]), flush=True)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
