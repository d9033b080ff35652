"""Where a decode step's host time goes, per phase, on a live server (issue 12).

    python -m bench.step_profile --model DIR [--engines dotllm xgrammar] [--concurrency 256]
                                 [--tokens 128] [--repeats 2] [--workloads ... schema-mix]

A vLLM general plugin of the benchmark's own (`install`, entry point `dotllm_step_profile`,
registered only where this runs: bench/gpu_profile.sh) wraps, in every process of the
server, the methods a step runs through with wall-clock timers: the scheduler's
`schedule`, `update_from_output` and `get_grammar_bitmask`, the structured-output
manager's `grammar_bitmask`, the grammars' `accept_tokens` and `fill_bitmask` (with
`--per-request-phases` only: once a request, their timers would slow the step), the
model runner's `execute_model` and `sample_tokens` (either runner), DotLLM's mask
application (its staging and launches apart), and the engine core's whole
`step_with_batch_queue`. Totals are written to
$DOTLLM_STEP_PROFILE_DIR/<pid>.json twice a second; the driver reads them before and
after each equal-work batch of bench.serve and reports each phase per step (one
`schedule` call is one step). What the step loop spends outside the phases (mostly
waiting for the GPU's result) is the loop's time less theirs. The engine core's and the
worker's phases a step are also kept call by call (start, end), and each batch's are read
by bench.step_timeline: which leg of the step the next one waited for (the worker's host
work, the GPU, the engine core's accept and schedule, the messages between), as
`timeline:` rows (`--timelines`: the raw calls too). `schema-mix` is bench.serve's
(real schemas, warm, each answer until complete), followed by its free twin of the same
lengths: where a batch that changes every step spends what the enum array does not.

Each `schedule` call also keeps the step's rows and tokens: where a batch of 256 sent at
once reaches the engine over time (on a GPU, with the benchmark's former httpx client,
over seconds: bench.client's doc), its steps run fewer rows than 256 and prompt tokens
besides. The report gives the rows a step and the period of the steps that ran the
batch's full width and decoded only; `--no-stream` asks for one response a request.

With each process's totals go where the OS ran it: the CPU its main thread was on at
each write, and its involuntary context switches (other work took its CPU). On an H100
host every phase of a batch ran up to 3x slower in some repeats than in others, all
together (bench/RESULTS.md): the report says, per batch, which CPUs the engine core and
the worker ran on, whether they shared a physical core, and how often they were
preempted, and the time the hypervisor took those CPUs for something else (steal, in a
VM). `--pin alternate` runs each workload twice a repeat on the same server: as the
OS places it, then with the engine core's and the worker's main threads each alone on a
physical core of its own (every other thread of the server, the API server's included,
kept off those two cores), to see whether placement is what moves a batch's speed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import gzip
import importlib
import itertools
import json
import math
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench import step_timeline

PROFILE_ENV = "DOTLLM_STEP_PROFILE_DIR"
PER_REQUEST_ENV = "DOTLLM_STEP_PROFILE_PER_REQUEST"
# (module, class, method, phase). Classes not loaded in a process are skipped there.
TARGETS = (
    ("vllm.v1.engine.core", "EngineCore", "step_with_batch_queue", "step loop"),
    ("vllm.v1.engine.core", "EngineCore", "step", "step loop"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "schedule", "schedule"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "update_from_output", "update_from_output"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "get_grammar_bitmask", "get_grammar_bitmask"),
    ("vllm.v1.structured_output", "StructuredOutputManager", "grammar_bitmask",
     "  manager.grammar_bitmask"),
    ("dotllm.vllm_ext.backend", "DotllmGrammar", "accept_tokens", "  accept_tokens (DotLLM)"),
    ("dotllm.vllm_ext.backend", "DotllmGrammar", "fill_bitmask", "  fill_bitmask (DotLLM)"),
    ("dotllm.vllm_ext.backend", "DotllmGrammar", "add_row", "  add_row (DotLLM)"),
    ("dotllm.vllm_ext.backend", None, "fill_rows", "  fill deferred rows (DotLLM)"),
    ("vllm.v1.structured_output.backend_xgrammar", "XgrammarGrammar", "accept_tokens",
     "  accept_tokens (xgrammar)"),
    ("vllm.v1.structured_output.backend_xgrammar", "XgrammarGrammar", "fill_bitmask",
     "  fill_bitmask (xgrammar)"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "execute_model",
     "execute_model (V1)"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "sample_tokens",
     "sample_tokens (V1)"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "execute_model",
     "execute_model (V2)"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "sample_tokens",
     "sample_tokens (V2)"),
    # In the worker's output thread (async scheduling): from taking a step's output to its
    # sampled tokens on the host, which waits for the GPU.
    ("vllm.v1.worker.gpu_model_runner", "AsyncGPUModelRunnerOutput", "get_output",
     "sampled tokens on the host (V1)"),
    ("vllm.v1.worker.gpu.async_utils", "AsyncOutput", "get_output",
     "sampled tokens on the host (V2)"),
    ("dotllm.vllm_ext.mask_kernels", None, "apply_rows", "  apply mask (DotLLM)"),
    ("dotllm.kernels.arena", "MaskArena", "_stage_cuda", "    staged: pinned fill, copies"),
    ("dotllm.kernels.arena", "MaskArena", "_launch", "    launches: resolve, mask"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "_bookkeeping_sync",
     "  bookkeeping (V1)"),
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "prepare_inputs",
     "  prepare_inputs (V2)"),
)

# Called once a request a step: a timer costs ~0.5 us a call (this CPU), ~0.26 ms a step at
# 256 requests for two such methods, which would inflate the constrained step it measures;
# timed only with --per-request-phases.
PER_REQUEST = {"accept_tokens", "fill_bitmask", "add_row"}

_totals: dict[str, list[float]] = {}  # phase -> [calls, seconds]
_lock = threading.Lock()
# The phases whose every call is also kept, with its start and end, for bench.step_timeline
# (the last ones: a few thousand steps of both processes).
TIMELINE_PHASES = frozenset({
    *step_timeline.ENGINE.values(), *(p for ps in step_timeline.WORKER.values() for p in ps)})
_timeline: collections.deque[step_timeline.Entry] = collections.deque(maxlen=100_000)
TIMELINE_WINDOW = "timeline-window"  # the driver's ask: "<id> <from> <to>", time.monotonic()


def _timed(phase: str, method):
    on_timeline = phase in TIMELINE_PHASES
    shaped = phase == step_timeline.ENGINE["schedule"]

    @functools.wraps(method)
    def timed(*args, **kwargs):
        started = time.monotonic()
        result = None
        try:
            result = method(*args, **kwargs)
            return result
        finally:
            ended = time.monotonic()
            with _lock:
                entry = _totals.setdefault(phase, [0, 0.0])
                entry[0] += 1
                entry[1] += ended - started
                if on_timeline:
                    _timeline.append((phase, started, ended,
                                      *(_shape(result) if shaped else ())))
    timed.step_profile = phase
    return timed


def _shape(scheduled) -> tuple[int, int] | tuple[()]:
    """A step's (rows, tokens), from what `schedule` returned (vLLM's SchedulerOutput):
    how wide the step was, and whether it also ran prompt tokens (more tokens than rows)."""
    tokens = getattr(scheduled, "num_scheduled_tokens", None)
    if not isinstance(tokens, dict):
        return ()
    return len(tokens), int(scheduled.total_num_scheduled_tokens)


def _wrap_loaded(per_request: bool) -> None:
    for module_name, class_name, method, phase in TARGETS:
        if method in PER_REQUEST and not per_request:
            continue
        try:
            module = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 (a runner or backend this install lacks)
            continue
        owner = getattr(module, class_name) if class_name else module
        current = getattr(owner, method, None)
        if current is not None and not hasattr(current, "step_profile"):
            setattr(owner, method, _timed(phase, current))


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _dump_timeline(directory: Path, dumped: str, pid: int) -> str:
    """The timeline's entries that start in the window the driver asked for, once a window
    (`<pid>.timeline`, JSON: the window's id and the entries); returns the id dumped."""
    try:
        ask = (directory / TIMELINE_WINDOW).read_text().split()
    except FileNotFoundError:
        return dumped
    if len(ask) != 3 or ask[0] == dumped:
        return dumped
    start, end = float(ask[1]), float(ask[2])
    with _lock:
        entries = [e for e in _timeline if start <= e[1] <= end]
    _write_atomically(directory / f"{pid}.timeline",
                      json.dumps({"id": ask[0], "entries": entries}))
    return ask[0]


def _write_forever(directory: Path) -> None:
    import psutil

    path = directory / f"{os.getpid()}.json"
    me = psutil.Process()
    cpus: dict[int, int] = {}  # CPU -> writes that found the main thread there
    dumped = ""
    while True:
        time.sleep(0.5)
        dumped = _dump_timeline(directory, dumped, os.getpid())
        cpu = me.cpu_num()
        cpus[cpu] = cpus.get(cpu, 0) + 1
        with _lock:
            text = json.dumps({"phases": _totals, "cpus": cpus,
                               "involuntary_switches": me.num_ctx_switches().involuntary})
        _write_atomically(path, text)


def install() -> None:
    """The plugin: acts where PROFILE_ENV is set, in the processes the server starts (the
    engine core and its workers), not in the API server that started them."""
    directory = os.environ.get(PROFILE_ENV)
    if not directory or multiprocessing.parent_process() is None:
        return
    _wrap_loaded(bool(os.environ.get(PER_REQUEST_ENV)))
    threading.Thread(target=_write_forever, args=(Path(directory),), daemon=True,
                     name="step-profile").start()


def read_processes(directory: Path) -> dict[str, dict]:
    """What each process last wrote, by pid."""
    return {path.stem: json.loads(path.read_text()) for path in directory.glob("*.json")}


def read_timelines(directory: Path, start: float, end: float, ask: str,
                   wait_s: float = 5.0) -> dict[str, list[step_timeline.Entry]]:
    """Each profiled process's timeline entries that started between `start` and `end`
    (time.monotonic()), by pid; `ask` names the window (a new one each time). Waits for
    every process that writes totals to answer, at most `wait_s`."""
    _write_atomically(directory / TIMELINE_WINDOW, f"{ask} {start} {end}")
    deadline = time.monotonic() + wait_s
    while True:
        answers = {}
        for path in directory.glob("*.timeline"):
            written = json.loads(path.read_text())
            if written["id"] == ask:
                answers[path.stem] = [tuple(e) for e in written["entries"]]
        if set(answers) >= set(read_processes(directory)) or time.monotonic() > deadline:
            return answers
        time.sleep(0.1)


def totals(processes: dict[str, dict]) -> dict[str, list[float]]:
    """Every process's totals, summed by phase."""
    out: dict[str, list[float]] = {}
    for written in processes.values():
        for phase, (calls, seconds) in written["phases"].items():
            entry = out.setdefault(phase, [0, 0.0])
            entry[0] += calls
            entry[1] += seconds
    return out


def _siblings(cpu: int) -> str:
    """The CPUs sharing `cpu`'s physical core (Linux's thread_siblings_list)."""
    path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
    return path.read_text().strip() if path.exists() else str(cpu)


def placement(before: dict[str, dict], after: dict[str, dict], steps: int) -> dict[str, dict]:
    """Per process of the batch (the engine core: it schedules; a worker: it runs the
    model), the CPUs its main thread was seen on, as `cpu (its core's siblings)`, and its
    involuntary context switches per step."""
    out = {}
    for pid, now in sorted(after.items()):
        was = before.get(pid, {"cpus": {}, "involuntary_switches": 0})
        phases = now["phases"]
        name = ("engine core" if "schedule" in phases
                else "worker" if any(p.startswith("execute_model") for p in phases) else pid)
        seen = {int(c): n - was["cpus"].get(c, 0) for c, n in now["cpus"].items()}
        switches = now["involuntary_switches"] - was["involuntary_switches"]
        out[f"{name} {pid}"] = {
            "cpus": [f"{c} ({_siblings(c)})" for c, n in sorted(seen.items()) if n > 0],
            "involuntary_switches_per_step": switches / steps if steps else math.nan}
    return out


def cpu_steal() -> dict[str, int]:
    """Per CPU, the time (USER_HZ ticks) the hypervisor ran something else on it: /proc/stat's
    steal column, 0 where there is none (no VM)."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *ticks = line.split()
        if name.startswith("cpu") and name != "cpu" and len(ticks) > 7:
            out[name[3:]] = int(ticks[7])
    return out


def steal_ms_per_step(before: dict[str, int], after: dict[str, int], cpus: list[str],
                      steps: int) -> float:
    """Milliseconds of steal a step on `cpus` (as `placement` names them: "14 (14)")."""
    hz = os.sysconf("SC_CLK_TCK")
    ticks = sum(after.get(c, 0) - before.get(c, 0) for c in {c.split()[0] for c in cpus})
    return ticks * 1e3 / hz / steps if steps else math.nan


@functools.cache
def _physical_cores() -> list[list[int]]:
    """The CPUs this process may use (before any pinning), grouped by physical core."""
    cores: dict[str, list[int]] = {}
    for cpu in sorted(os.sched_getaffinity(0)):
        cores.setdefault(_siblings(cpu), []).append(cpu)
    return list(cores.values())


def pin(server_pid: int, processes: dict[str, dict], on: bool) -> dict[str, list[int]]:
    """With `on`, the engine core's and the worker's main threads each on a physical core
    of its own and every other thread of the server's processes and of this one (the
    load) off both; else every thread anywhere. Returns the main threads' CPUs."""
    import psutil

    cores = _physical_cores()
    everywhere = [c for core in cores for c in core]
    mains = {pid: ("engine core" if "schedule" in written["phases"] else "worker")
             for pid, written in processes.items()
             if "schedule" in written["phases"]
             or any(p.startswith("execute_model") for p in written["phases"])}
    owned = {}
    if on:
        if len(cores) < len(mains) + 1:
            raise SystemExit(f"--pin: {len(cores)} physical cores, {len(mains) + 1} needed")
        for pid, core in zip(sorted(mains), cores[-len(mains):], strict=True):
            owned[int(pid)] = core[:1]
        rest = [c for core in cores[:-len(mains)] for c in core]
    root = psutil.Process(server_pid)
    for process in [root, *root.children(recursive=True), psutil.Process()]:
        try:
            for thread in process.threads():
                cpus = owned.get(thread.id, rest) if on else everywhere
                os.sched_setaffinity(thread.id, cpus)
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return {f"{mains[str(pid)]} {pid}": cpus for pid, cpus in owned.items()}


def per_step(before: dict, after: dict) -> tuple[dict[str, float], int]:
    """Milliseconds per step of each phase between two reads, and the steps."""
    delta = {p: (after[p][0] - before.get(p, [0, 0])[0], after[p][1] - before.get(p, [0, 0])[1])
             for p in after}
    steps = delta.get("schedule", (0, 0))[0]
    if not steps:
        return {}, 0
    return {p: seconds * 1e3 / steps for p, (_, seconds) in sorted(delta.items())}, steps


def main(argv: list[str] | None = None) -> int:
    from bench import scenarios, serve, servers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", choices=servers.ENGINES, default=["dotllm"])
    parser.add_argument("--workloads", nargs="+",
                        choices=(*scenarios.EQUAL_WORK, scenarios.SCHEMA_MIX),
                        default=["free", "enum-array", "long-string"],
                        help="schema-mix runs its free twin after it (bench.serve's)")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=256,
                        help="the cap on a schema-mix answer")
    parser.add_argument("--mix-subset", default="Glaiveai2K")
    parser.add_argument("--mix-schemas", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model")
    parser.add_argument("--serve-arg", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("step-profile.json"))
    parser.add_argument("--no-stream", action="store_true",
                        help="each request answered in one response (bench.serve's)")
    parser.add_argument("--per-request-phases", action="store_true",
                        help="also time the grammars' per-request calls (slows the step)")
    parser.add_argument("--timelines", type=Path,
                        help="also write each batch's raw timelines here (gzipped JSON)")
    parser.add_argument("--pin", choices=("off", "alternate"), default="off",
                        help="alternate: each workload as placed, then pinned (module doc)")
    args = parser.parse_args(argv)
    schemas = serve.mix_schemas(args) if scenarios.SCHEMA_MIX in args.workloads else []
    results, raw_timelines = [], []

    def profiled(url: str, model: str, engine: str, workload: str, repeat: int, pinned: bool,
                 profile_dir: Path, requests=None):
        """One batch, its phases a step appended to `results`."""
        time.sleep(1.0)  # the totals files catch up
        before, steal_before = read_processes(profile_dir), cpu_steal()
        started = time.monotonic()
        batch = asyncio.run(serve.run_batch(
            url, model, engine, workload, args.concurrency, args.tokens, args.max_tokens,
            repeat, requests=requests, stream=not args.no_stream))
        ended = time.monotonic()
        time.sleep(1.0)
        after, steal_after = read_processes(profile_dir), cpu_steal()
        phases, steps = per_step(totals(before), totals(after))
        timelines = read_timelines(profile_dir, started, ended, f"{len(results)}")
        if args.timelines:  # rewritten after each batch: a call's limit may end the run
            raw_timelines.append({"engine": engine, "workload": workload, "repeat": repeat,
                                  "pinned": pinned, "processes": timelines})
            with gzip.open(args.timelines, "wt") as f:
                json.dump(raw_timelines, f)
        engine_calls, worker_calls = step_timeline.by_process(timelines)
        path = step_timeline.critical_path(engine_calls, worker_calls)
        rows, at_full, on_full = step_timeline.full_width(engine_calls, worker_calls)
        where = placement(before, after, steps)
        for process in where.values():
            process["steal_ms_per_step"] = steal_ms_per_step(
                steal_before, steal_after, process["cpus"], steps)
        results.append({"engine": engine + ("-pinned" if pinned else ""), "workload": workload,
                        "repeat": repeat, "itl_ms": batch.engine_itl_s * 1e3,
                        "errors": len(batch.errors), "phases_ms": phases,
                        "steps_without_host": batch.steps_without_host,
                        "steps_sat_out": batch.steps_sat_out, "placement": where,
                        "critical_path_ms": path,
                        "rows_a_step": statistics.median(rows) if rows else math.nan,
                        "widest": max(rows, default=0), "steps_at_full_width": at_full,
                        "period_at_full_width_ms": on_full["period"]})
        print(json.dumps(results[-1]), flush=True)
        return batch

    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines:
            profile_dir = Path(tempfile.mkdtemp(dir=tmp))
            server = servers.start(engine, args.model, args.serve_arg,
                                   {PROFILE_ENV: str(profile_dir),
                                    PER_REQUEST_ENV: "1" if args.per_request_phases else ""},
                                   Path(tempfile.mkdtemp(dir=tmp)),
                                   extra_plugins=("dotllm_step_profile",))
            try:
                model = asyncio.run(servers.served_model(server.url))
                asyncio.run(serve.warm(server.url, model, args.workloads, args.tokens,
                                       scenarios.schema_mix(schemas, len(schemas))))
                for repeat, workload in itertools.product(range(args.repeats), args.workloads):
                    # Alternate which goes first, so neither always follows the other.
                    pinnings = {"off": (False,), "alternate": (False, True)}[args.pin]
                    for pinned in pinnings[::-1] if repeat % 2 else pinnings:
                        if args.pin != "off":
                            pin(server.process.pid, read_processes(profile_dir), pinned)
                        run = functools.partial(profiled, server.url, model, engine,
                                                repeat=repeat, pinned=pinned,
                                                profile_dir=profile_dir)
                        if workload != scenarios.SCHEMA_MIX:
                            run(workload)
                            continue
                        mix = run(workload, requests=scenarios.schema_mix(
                            schemas, args.concurrency))
                        run(scenarios.MATCHED_FREE,
                            requests=scenarios.matched_free(mix.tokens, mix.status))
            finally:
                servers.stop_server(server)
    args.out.write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


def table(results: list[dict]) -> str:
    """Phases (rows) by engine/workload (columns), ms per step: the median of the repeats;
    the step against the same repeat's baseline's (free; the schema mix's free twin), as
    bench.serve reports it; where the processes ran: the last repeat's."""
    from bench import serve

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["engine"], r["workload"]), []).append(r)
    last = {c: rs[-1] for c, rs in groups.items()}
    columns = list(groups)
    ratios = serve.step_ratios([{"engine": r["engine"], "scenario": r["workload"],
                                 "concurrency": 0, "repeat": r["repeat"],
                                 "engine_itl_s": r["itl_ms"]} for r in results])
    phases = sorted({p for r in results for p in r["phases_ms"]},
                    key=lambda p: [t[3] for t in TARGETS].index(p)
                    if p in [t[3] for t in TARGETS] else 99)

    def median(c: tuple[str, str], value) -> float:
        return statistics.median(value(r) for r in groups[c])

    lines = ["| phase (ms per step, median of the repeats) | "
             + " | ".join(f"{e} {w}" for e, w in columns) + " |",
             "|---|" + "---|" * len(columns),
             "| vLLM ITL, median [min-max] | " + " | ".join(
                 serve.spread([r["itl_ms"] for r in groups[c]]) for c in columns) + " |",
             "| x its baseline, median [min-max] | " + " | ".join(
                 serve.spread(ratios.get((*c, 0), [])) for c in columns) + " |",
             "| steps sampled without the host | " + " | ".join(
                 f"{median(c, lambda r: r.get('steps_without_host', math.nan)):.0%}"
                 for c in columns) + " |"]
    lines.append("| rows a step: median (widest) | " + " | ".join(
        f"{median(c, lambda r: r.get('rows_a_step', math.nan)):.0f} "
        f"({median(c, lambda r: r.get('widest', 0)):.0f})" for c in columns) + " |")
    lines.append("| timeline: period at full width (steps) | " + " | ".join(
        f"{median(c, lambda r: r.get('period_at_full_width_ms', math.nan)):.2f} "
        f"({median(c, lambda r: r.get('steps_at_full_width', 0)):.0f})" for c in columns)
        + " |")
    for leg in step_timeline.FIELDS:
        lines.append(f"| timeline: {leg} | " + " | ".join(
            f"{median(c, lambda r, k=leg: r.get('critical_path_ms', {}).get(k, math.nan)):.2f}"
            for c in columns) + " |")
    for phase in phases:
        lines.append(f"| {phase} | " + " | ".join(
            f"{median(c, lambda r, p=phase: r['phases_ms'].get(p, 0)):.2f}" for c in columns)
            + " |")
    for process in ("engine core", "worker"):
        where = [{k: v for k, v in last[c].get("placement", {}).items()
                  if k.startswith(process)} for c in columns]
        lines.append(f"| {process}: CPUs (its core's) | " + " | ".join(
            "; ".join(", ".join(p["cpus"]) for p in w.values()) for w in where) + " |")
        lines.append(f"| {process}: preempted a step | " + " | ".join(
            "; ".join(f"{p['involuntary_switches_per_step']:.2f}" for p in w.values())
            for w in where) + " |")
        lines.append(f"| {process}: its CPUs' steal, ms a step | " + " | ".join(
            "; ".join(f"{p.get('steal_ms_per_step', math.nan):.2f}" for p in w.values())
            for w in where) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
