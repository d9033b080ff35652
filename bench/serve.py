"""The serving benchmark: DotLLM against stock vLLM (or any OpenAI-compatible server) on
your model and GPU: per-step cost at equal work, time to first token, time to a complete
valid answer, and what share of real-world schemas each engine serves validly.

    python -m bench.serve [--engines dotllm xgrammar] [--url NAME=URL ...]
                          [--scenarios free enum-array schema ...] [--concurrency 1 16 64 256]
                          [--tokens 64] [--repeats 3] [--model DIR --serve-arg=--load-format=dummy]
                          [--arrival-s 0] [--out DIR]
    python -m bench.serve --report DIR      # the tables and plots again, from DIR's results

Scenarios: bench/scenarios.py. Each engine gets a fresh server (a fresh index cache: cold),
is warmed with one request per scenario, then runs every scenario at every concurrency,
--repeats times, in turn on the same server: a ratio to `free` is within one server and
one repeat (identical work varies by tens of percent between server starts). Per-step
figures are vLLM's own `vllm:inter_token_latency_seconds` and TTFT histograms read from
/metrics around each batch (engine-side: with many streams client-side gaps measure the
API server); client-side TTFT, ITL and time to a complete answer are kept per request.
A batch's requests start at once, or with --arrival-s S evenly over S seconds: newcomers
then join a running batch every few steps, as in a server's steady state.
`unique` sends --unique-schemas real schemas of each --subsets once cold, then (its
compiles over) once warm, --unique-concurrency at a time: TTFT, served, ended, valid;
one subset after another, or with --unique-together all in one batch.
Stock vLLM 0.26 honours disable_any_whitespace only server-wide: `schema-compact` runs on a
second start of a stock engine with it set (said in the results' `note`).

Writes DIR/results.jsonl (a line per batch or unique request), DIR/summary.md and, where
matplotlib is installed, DIR/*.png (bench/serve_plots.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import httpx
import numpy as np

from bench import prometheus, scenarios, servers
from bench.client import Reply, complete, get_text, session
from bench.scenarios import DOCUMENTS, EQUAL_WORK, STEP_COMPARED

PROMPT = "Reply in JSON:"
ITL = "vllm:inter_token_latency_seconds"
TTFT = "vllm:time_to_first_token_seconds"
STEPS = "vllm:iteration_tokens_total_count"
GENERATED = "vllm:generation_tokens_total"
WITHOUT_HOST = "dotllm_steps_sampled_without_host_total"
SAT_OUT = "dotllm_steps_sat_out_total"
QUANTILES = (0.5, 0.9, 0.99)


@dataclass
class Batch:
    """`concurrency` requests of one scenario sent at once."""
    engine: str
    scenario: str
    concurrency: int
    repeat: int
    wall_s: float
    tokens: list[int]
    ttft_s: list[float]  # client-side, per request
    e2e_s: list[float]  # client-side: to the last token
    constrained: list[bool]
    status: list[str]
    valid: list[bool | None]  # None: unconstrained, or cut by max_tokens
    client_itl_s: list[float]  # p50, p90, p99 of every gap of every request
    engine_itl_s: float  # vLLM's histogram: the mean step over the batch's tokens
    engine_ttft_s: float
    # Tokens the engine sampled a step, its batch's mean width: where requests reach the
    # engine over time (a slow client: bench.client's doc; or the API server), a batch of
    # 256 decodes fewer rows a step, and two batches of one scenario then compare steps of
    # different widths.
    rows_per_step: float = float("nan")
    # Share of the engine's steps sampled without waiting for the host (device states).
    steps_without_host: float = float("nan")
    # Steps requests the device did not hold sat out so that the batch did not wait.
    steps_sat_out: float = 0.0
    arrival_s: float = 0.0  # the requests started evenly over this window (0: at once)
    streamed: bool = True  # else one response a request: no client TTFT nor ITL
    errors: list[str] = field(default_factory=list)
    note: str = ""
    kind: str = "batch"
    retries: int = 0  # connections reset before a response started, tried again
    # Per request: the server named what of its schema it did not enforce (client.Reply).
    unenforced: list[bool] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens) / self.wall_s


@dataclass
class UniqueReply:
    """One real schema's request, cold (never compiled on this server) or warm."""
    engine: str
    subset: str
    schema_id: str
    phase: str
    status: str
    ttft_s: float
    e2e_s: float
    tokens: int
    ended: bool
    valid: bool | None
    error: str | None
    kind: str = "unique"
    unenforced: bool = False  # the server named what of the schema it did not enforce


def _payload(model: str, body: dict, max_tokens: int, temperature: float = 1.0) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
            "temperature": temperature, **body}


def _fraction(part: float, whole: float) -> float:
    return part / whole if whole else float("nan")


def _verdict(reply: Reply, request: scenarios.Request) -> bool | None:
    if reply.status != "ok" or request.check is None or reply.finish != "stop":
        return None
    return request.check(reply.text)


async def run_batch(base_url: str, model: str, engine: str, scenario: str, concurrency: int,
                    tokens: int, max_tokens: int, repeat: int, note: str = "",
                    temperature: float = 1.0, arrival_s: float = 0.0,
                    requests: list[scenarios.Request] | None = None,
                    stream: bool = True) -> Batch:
    """One batch: `requests`, or `concurrency` of `scenario`'s."""
    if requests is None:
        requests = scenarios.batch(scenario, concurrency, tokens)
    async def arriving(i: int, request: scenarios.Request) -> Reply:
        await asyncio.sleep(i * arrival_s / concurrency)
        return await complete(client, _payload(
            model, request.body, request.steps or max_tokens, temperature), stream)

    async with session(base_url) as client:
        before = prometheus.samples(await get_text(client, "/metrics"))
        started = time.perf_counter()
        replies = await asyncio.gather(*(arriving(i, r) for i, r in enumerate(requests)))
        wall = time.perf_counter() - started
        after = prometheus.samples(await get_text(client, "/metrics"))
    errors = [r.error for r in replies if r.error]
    errors += [f"ran {reply.tokens} steps, not {r.steps}"
               for reply, r in zip(replies, requests, strict=True)
               if r.steps and reply.status == "ok" and reply.tokens != r.steps]
    gaps = [g for r in replies for g in r.gaps_s]
    return Batch(
        engine, scenario, concurrency, repeat, wall,
        tokens=[r.tokens for r in replies], ttft_s=[r.ttft_s for r in replies],
        e2e_s=[r.e2e_s for r in replies], constrained=[r.constrained for r in requests],
        status=[r.status for r in replies],
        valid=[_verdict(reply, r) for reply, r in zip(replies, requests, strict=True)],
        client_itl_s=[float(x) for x in np.quantile(gaps, QUANTILES)] if gaps else [],
        engine_itl_s=prometheus.mean_between(before, after, ITL),
        engine_ttft_s=prometheus.mean_between(before, after, TTFT),
        rows_per_step=_fraction(prometheus.increase(before, after, GENERATED),
                                prometheus.increase(before, after, STEPS)),
        steps_without_host=_fraction(prometheus.increase(before, after, WITHOUT_HOST),
                                  prometheus.increase(before, after, STEPS)),
        steps_sat_out=prometheus.increase(before, after, SAT_OUT),
        arrival_s=arrival_s, streamed=stream, errors=errors, note=note,
        retries=sum(r.retries for r in replies),
        unenforced=[bool(r.unenforced) for r in replies])


async def run_unique(base_url: str, model: str, engine: str, subsets: list[str], sample: int,
                     concurrency: int, max_tokens: int, seed: int, progress, phase: str,
                     temperature: float = 1.0) -> list[UniqueReply]:
    """`sample` schemas of each of `subsets`, all in one batch; then until the compiles
    they started are over (what a warm server serves)."""
    from bench.jsonschemabench import load

    cases = [case for subset in subsets for case in load(subset, sample, seed)]
    gate = asyncio.Semaphore(concurrency)

    async def one(client, case) -> UniqueReply:
        request = scenarios.Request({"structured_outputs": {"json": case.schema}},
                                    scenarios.schema_check(case.schema))
        async with gate:
            reply = await complete(
                client, _payload(model, request.body, max_tokens, temperature))
        progress(1)
        return UniqueReply(engine, case.subset, case.id, phase, reply.status, reply.ttft_s,
                           reply.e2e_s, reply.tokens, reply.finish == "stop",
                           _verdict(reply, request), reply.error,
                           unenforced=bool(reply.unenforced))

    async with session(base_url) as client:
        out = await asyncio.gather(*(one(client, case) for case in cases))
    await servers.compiles_done(base_url)
    return out


async def warm(base_url: str, model: str, batch_scenarios: list[str], tokens: int,
               mix: list[scenarios.Request] = ()) -> None:
    """One request per scenario (each of the schema mix's schemas), then until the compiles
    they started are over: what a warm server serves."""
    async with session(base_url) as client:
        for scenario in batch_scenarios:
            requests = (mix if scenario == scenarios.SCHEMA_MIX
                        else scenarios.batch(scenario, 1, tokens)[:1])
            await asyncio.gather(*(complete(client, _payload(model, r.body, tokens))
                                   for r in requests))
    await servers.compiles_done(base_url)


class Progress:
    """A progress bar on stderr (tqdm's, vLLM's dependency), one line per finished batch."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, file=sys.stderr, unit="req", dynamic_ncols=True)

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def say(self, line: str) -> None:
        self.bar.write(line, file=sys.stderr)


def mix_schemas(args) -> list[dict]:
    """The schema mix's schemas (`--mix-subset`, `--mix-schemas`, `--seed`)."""
    from bench.jsonschemabench import load

    return [case.schema for case in load(args.mix_subset, args.mix_schemas, args.seed)]


def measure(base_url: str, engine: str, args, batch_scenarios: list[str], unique: bool,
            out, progress: Progress, note: str = "") -> None:
    """Every scenario on one server, written to `out` as it comes."""
    model = asyncio.run(servers.served_model(base_url))
    schemas = mix_schemas(args) if scenarios.SCHEMA_MIX in batch_scenarios else []
    asyncio.run(warm(base_url, model, batch_scenarios, args.tokens,
                     scenarios.schema_mix(schemas, len(schemas))))
    progress(len(batch_scenarios))

    def run(scenario: str, c: int, repeat: int, requests=None) -> Batch:
        batch = asyncio.run(run_batch(base_url, model, engine, scenario, c, args.tokens,
                                      args.max_tokens, repeat, note, args.temperature,
                                      args.arrival_s, requests, not args.no_stream))
        out.write(json.dumps(asdict(batch)) + "\n")
        out.flush()
        progress(len(batch.tokens))
        progress.say(f"{engine} {scenario} x{c} #{repeat}: step "
                     f"{batch.engine_itl_s * 1e3:.2f} ms, TTFT p50 "
                     f"{_median(batch.ttft_s):.3f} s, {batch.tokens_per_s:,.0f} tok/s, "
                     f"{batch.steps_without_host:.0%} of steps without the host"
                     + (f", {len(batch.errors)} errors: {batch.errors[0]}"
                        if batch.errors else ""))
        return batch

    for c in args.concurrency:
        for repeat in range(args.repeats):
            for scenario in batch_scenarios:
                if scenario != scenarios.SCHEMA_MIX:
                    run(scenario, c, repeat)
                    continue
                mix = run(scenario, c, repeat, scenarios.schema_mix(schemas, c))
                # Its equal work: free requests as long as its served answers.
                run(scenarios.MATCHED_FREE, c, repeat,
                    scenarios.matched_free(mix.tokens, mix.status))
    if unique:
        batches = [args.subsets] if args.unique_together else [[s] for s in args.subsets]
        for subsets in batches:
            for phase in ("cold", "warm"):  # each written as it ends
                replies = asyncio.run(run_unique(base_url, model, engine, subsets,
                                                 args.unique_schemas, args.unique_concurrency,
                                                 args.max_tokens, args.seed, progress, phase,
                                                 args.temperature))
                for reply in replies:
                    out.write(json.dumps(asdict(reply)) + "\n")
                out.flush()


# -- report -----------------------------------------------------------------------------

def _median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """median [min-max]"""
    v = sorted(x * scale for x in values if not math.isnan(x))
    if not v:
        return "-"
    return f"{statistics.median(v):.{digits}f} [{v[0]:.{digits}f}-{v[-1]:.{digits}f}]"


def _share(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / whole:.0f} %)" if whole else "-"


def load_results(path: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return ([r for r in records if r.get("kind") == "batch"],
            [r for r in records if r.get("kind") == "unique"])


def _groups(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def _requests(batch: dict) -> list[dict]:
    """A batch's per-request fields, a dict per request."""
    fields = ("ttft_s", "e2e_s", "tokens", "status", "valid", "constrained")
    # Results written before `unenforced` was recorded lack it.
    unenforced = batch.get("unenforced") or [False] * len(batch["status"])
    return [dict(zip(fields, values, strict=True), unenforced=told)
            for *values, told in zip(*(batch[f] for f in fields), unenforced, strict=True)]


def _valid_share(ended: list[dict]) -> str:
    """Valid answers of those that ended, and how many invalid ones the server had said
    it might write (the schema's unenforced parts, named in the response)."""
    told = sum(not r["valid"] and r.get("unenforced", False) for r in ended)
    return (_share(sum(bool(r["valid"]) for r in ended), len(ended))
            + (f", {told} invalid as reported" if told else ""))


def step_ratios(batches: list[dict]) -> dict[tuple, list[float]]:
    """(engine, scenario, concurrency) -> the engine's step over the same server's, same
    repeat's baseline step (`free`; a schema mix's own free twin), per repeat."""
    steps = {(b["engine"], b["scenario"], b["concurrency"], b["repeat"]): b["engine_itl_s"]
             for b in batches}
    ratios: dict[tuple, list[float]] = {}
    for b in batches:
        if b["scenario"] not in STEP_COMPARED:
            continue
        base = steps.get((b["engine"], scenarios.baseline(b["scenario"]), b["concurrency"],
                          b["repeat"]))
        if base:
            ratios.setdefault((b["engine"], b["scenario"], b["concurrency"]), []).append(
                b["engine_itl_s"] / base)
    return ratios


def summary(batches: list[dict], unique: list[dict]) -> str:
    """Markdown tables: medians [min-max] over repeats."""
    parts = []
    equal = [b for b in batches if b["scenario"] in STEP_COMPARED]
    if equal:
        ratios = step_ratios(batches)
        rows = ["| engine | scenario | concurrency | step ms (engine) | rows a step (engine) "
                "| x free (or twin) | steps without host % | steps sat out | tok/s "
                "| TTFT ms (engine) | client ITL p50 / p99 ms | errors |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for (engine, scenario, c), group in _groups(equal, "engine", "scenario",
                                                     "concurrency").items():
            itl = [b["client_itl_s"] for b in group if b["client_itl_s"]]
            rows.append(
                f"| {engine} | {scenario} | {c} "
                f"| {spread([b['engine_itl_s'] for b in group], 1e3)} "
                f"| {spread([b.get('rows_per_step', math.nan) for b in group], digits=0)} "
                f"| {spread(ratios.get((engine, scenario, c), []))} "
                f"| {spread([b.get('steps_without_host', math.nan) for b in group], 100, 0)} "
                f"| {spread([b.get('steps_sat_out', 0.0) for b in group], digits=0)} "
                f"| {spread([sum(b['tokens']) / b['wall_s'] for b in group], digits=0)} "
                f"| {spread([b['engine_ttft_s'] for b in group], 1e3, 1)} "
                f"| {spread([q[0] for q in itl], 1e3)} / {spread([q[2] for q in itl], 1e3)} "
                f"| {sum(len(b['errors']) for b in group)} |")
        arrival = equal[0].get("arrival_s", 0.0)
        streamed = {b.get("streamed", True) for b in equal}
        parts += ["### Equal work: the cost of a step"
                  + (f" (requests arriving evenly over {arrival:g} s)" if arrival else "")
                  + (" (not streamed)" if streamed == {False} else
                     " (some batches not streamed)" if False in streamed else ""),
                  "", *rows, ""]
    documents = [b for b in batches if b["scenario"] in (*DOCUMENTS, scenarios.SCHEMA_MIX)]
    if documents:
        rows = ["| engine | scenario | concurrency | TTFT p50 s | complete answer p50 / p90 s "
                "| tokens p50 | ended | valid of ended | refused | note |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for (engine, scenario, c), group in _groups(documents, "engine", "scenario",
                                                     "concurrency").items():
            served = [r for b in group for r in _requests(b) if r["status"] == "ok"]
            ended = [r for r in served if r["valid"] is not None]
            e2e = [r["e2e_s"] for r in served]
            rows.append(
                f"| {engine} | {scenario} | {c} | {_median([r['ttft_s'] for r in served]):.3f} "
                f"| {_median(e2e):.3f} / "
                f"{float(np.quantile(e2e, 0.9)) if e2e else float('nan'):.3f} "
                f"| {_median([r['tokens'] for r in served]):.0f} "
                f"| {_share(len(ended), len(served))} | {_valid_share(ended)} "
                f"| {sum(s == '400' for b in group for s in b['status'])} "
                f"| {group[0]['note']} |")
        parts += ["### Documents: time to a complete answer", "", *rows, ""]
    if unique:
        rows = ["| engine | subset | phase | served | ended | valid of ended | TTFT p50 / p90 / "
                "max s |", "|---|---|---|---|---|---|---|"]
        for (engine, subset, phase), group in _groups(unique, "engine", "subset",
                                                       "phase").items():
            served = [r for r in group if r["status"] == "ok"]
            ended = [r for r in served if r["ended"]]
            ttft = [r["ttft_s"] for r in served]
            q = np.quantile(ttft, (0.5, 0.9, 1.0)) if ttft else [float("nan")] * 3
            rows.append(f"| {engine} | {subset} | {phase} | {_share(len(served), len(group))} "
                        f"| {_share(len(ended), len(served))} "
                        f"| {_valid_share(ended)} "
                        f"| {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f} |")
        parts += ["### Real schemas, each once cold then once warm", "", *rows, ""]
    return "\n".join(parts)


def report(out_dir: Path) -> str:
    """summary.md and the plots from out_dir/results.jsonl; returns the summary."""
    batches, unique = load_results(out_dir / "results.jsonl")
    if len({b.get("arrival_s", 0.0) for b in batches}) > 1:
        raise SystemExit(f"{out_dir}: batches of different --arrival-s in one results "
                         "file; give each setting its own --out")
    text = summary(batches, unique)
    (out_dir / "summary.md").write_text(text + "\n")
    try:
        from bench import serve_plots
    except ImportError as e:  # matplotlib: a GPU host may lack it; plot where it is
        print(f"no plots ({e}): run `python -m bench.serve --report {out_dir}` where "
              "matplotlib is installed", file=sys.stderr)
    else:
        for path in serve_plots.plot_all(batches, unique, step_ratios(batches), out_dir):
            print(f"plot: {path}", file=sys.stderr)
    return text


# -- command line -----------------------------------------------------------------------

def _stopped(signum, frame):
    """A stop from outside (`timeout`, a device call's limit) ends as Ctrl-C does: the
    server stopped, its log kept, every batch that ended already written."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="*", choices=servers.ENGINES, default=["dotllm"],
                        help="servers to start, one after the other")
    parser.add_argument("--url", action="append", default=[], metavar="NAME=URL",
                        help="a running OpenAI-compatible server to measure too (repeat)")
    parser.add_argument("--scenarios", nargs="+", choices=scenarios.SCENARIOS,
                        default=["free", "enum-array", "schema", "schema-compact", "regex",
                                 "choice"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--tokens", type=int, default=64,
                        help="decode steps per request of the equal-work scenarios")
    parser.add_argument("--max-tokens", type=int, default=256,
                        help="the cap on a document scenario's or a real schema's answer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arrival-s", type=float, default=0.0,
                        help="start a batch's requests evenly over this many seconds "
                        "(default: all at once)")
    parser.add_argument("--no-stream", action="store_true",
                        help="the batches' requests answered in one response each, not "
                        "streamed: no chunk a token a request for the API server to "
                        "format (no client TTFT nor ITL then: the engine's)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="0: greedy, the same answers wherever the engine is exact (equal "
                        "work between DotLLM with and without forced drafts)")
    parser.add_argument("--subsets", nargs="+", default=["Github_trivial", "Glaiveai2K"],
                        help="JSONSchemaBench subsets for `unique`")
    parser.add_argument("--unique-schemas", type=int, default=20, help="per subset")
    parser.add_argument("--unique-concurrency", type=int, default=8)
    parser.add_argument("--unique-together", action="store_true",
                        help="every subset's schemas in one batch (issue 14's 128 at once), "
                             "not one subset after another")
    parser.add_argument("--mix-subset", default="Glaiveai2K",
                        help="the JSONSchemaBench subset of `schema-mix`")
    parser.add_argument("--mix-schemas", type=int, default=64,
                        help="distinct schemas in `schema-mix` (a batch goes round them)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="a model directory or Hub id (default: embedded)")
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="an option for every started server (repeat; '--x=y' form)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for every started server (repeat)")
    parser.add_argument("--out", type=Path, default=Path("serve-results"))
    parser.add_argument("--report", type=Path, metavar="DIR",
                        help="only write DIR's summary and plots again")
    args = parser.parse_args(argv)
    if args.report:
        print(report(args.report))
        return 0
    batch_scenarios = [s for s in args.scenarios if s != "unique"]
    if any(s in EQUAL_WORK for s in batch_scenarios) and "free" not in batch_scenarios:
        parser.error("equal-work scenarios need free: their ratios are against it")
    urls = dict(item.split("=", 1) for item in args.url)
    if not args.engines and not urls:
        parser.error("nothing to measure: --engines or --url")
    unique = "unique" in args.scenarios
    per_batch = len(batch_scenarios) + (scenarios.SCHEMA_MIX in batch_scenarios)  # its twin
    per_server = (len(batch_scenarios) + sum(args.concurrency) * args.repeats * per_batch
                  + 2 * unique * args.unique_schemas * len(args.subsets))
    progress = Progress(per_server * (len(args.engines) + len(urls)))
    env = dict(item.split("=", 1) for item in args.env)
    args.out.mkdir(parents=True, exist_ok=True)
    if (args.out / "results.jsonl").exists() and {
            b.get("arrival_s", 0.0) for b in load_results(args.out / "results.jsonl")[0]
    } - {args.arrival_s}:
        parser.error(f"{args.out} holds batches of another --arrival-s: choose another --out")
    failed: list[str] = []
    signal.signal(signal.SIGTERM, _stopped)
    with open(args.out / "results.jsonl", "a") as out, tempfile.TemporaryDirectory() as tmp:
        for name, url in urls.items():
            measure(url, name, args, batch_scenarios, unique, out, progress)
        for engine in args.engines:
            # Stock: schema-compact needs a server of its own (whitespace is server-wide).
            split = engine in servers.STOCK_BACKENDS and "schema-compact" in batch_scenarios
            runs = [(False, [s for s in batch_scenarios if not split or s != "schema-compact"],
                     unique, "")]
            if split:
                runs.append((True, ["schema-compact"], False,
                             "stock: disable_any_whitespace server-wide"))
            for compact, chosen, with_unique, note in runs:
                server = servers.start(engine, args.model, args.serve_arg, env,
                                       Path(tempfile.mkdtemp(dir=tmp)), compact=compact)
                try:
                    measure(server.url, engine, args, chosen, with_unique, out, progress, note)
                except (httpx.TransportError, aiohttp.ClientError) as e:
                    # The server went away mid-batch: say so, keep its log, go on with the
                    # next engine (its results so far are written).
                    failed.append(f"{engine}: {e!r} (log: {server.log.name})")
                finally:
                    servers.stop_server(server)
                    (args.out / "logs").mkdir(exist_ok=True)
                    shutil.copy(server.log, args.out / "logs" / server.log.name)
    progress.bar.close()
    print(report(args.out))
    for failure in failed:
        print(f"server failed: {failure}", file=sys.stderr)
    if failed:
        return 1
    batches, replies = load_results(args.out / "results.jsonl")
    return 1 if any(b["errors"] and b["scenario"] in (*EQUAL_WORK, scenarios.MATCHED_FREE)
                    for b in batches) else 0


if __name__ == "__main__":
    raise SystemExit(main())
