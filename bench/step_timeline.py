"""Which process a decode step waits for, from the engine core's and the worker's phases on
one clock (issue 12).

Per-phase totals (bench.step_profile) say how long each process works a step, not what the
next step waits for: in the H100 profiles of sessions 25-26 the worker's `execute_model`
and `sample_tokens` took 2.3-2.7 ms a step against a step of 3.0-4.4 ms, so the worker
was idle a third of the time, waiting for something. With async scheduling and vLLM's
batch queue of two, step t+2 is sent to the worker only after the engine core has step t's
sampled tokens and has accepted them and scheduled t+2; so each step is on one of two
paths: the worker's own host work, or the ring worker -> GPU -> engine core -> worker:

    worker busy   = execute_model(t+2) and sample_tokens(t+2), their own time
    worker idle   = sample_tokens(t+2) end - sample_tokens(t+1) end - worker busy
    sample wait   = sample_tokens(t+2) start - execute_model(t+2) end (part of the idle:
                    the plan comes in a message of its own, after the step's send)
    gpu tail      = step t's tokens on the host (the output thread's `get_output`, after
                    the GPU's copy) - sample_tokens(t) end
    back          = update_from_output(t) start - those tokens on the host (the message
                    queue, and the engine core busy elsewhere)
    turnaround    = schedule(t+2) end - update_from_output(t) start (accept, the loop,
                    schedule; the plan of a step not deferred comes after the send)
    dispatch      = execute_model(t+2) start - schedule(t+2) end (the message queue)

`python -m bench.step_timeline FILE.json.gz` reads a profile's raw timelines (its
`--timelines`): each batch's legs over all its steady steps, its slowest third, its
fastest third (what the slow steps waited for that the fast ones did not), and the steps
that ran the batch's full width and decoded only (`at_full_width`: where requests reach the
engine over time, the others run fewer rows or prompt tokens, and batches of one workload
then differ in what their steps did).

Each is matched by time (the latest event of the other process before it), except the gpu
tail, which pairs a worker's k-th sampling with its k-th output (one each, in order: a
timeline starts with the server idle, as bench.step_profile's batches do). Timestamps are
`time.monotonic()`, one clock for every process of a host.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import itertools
import json
import statistics
from collections.abc import Callable, Iterable

# (phase, start, end), seconds; `schedule`'s also (rows, tokens): the step's width, and
# its tokens (more than its rows where prompt tokens ran in it).
Entry = tuple[str, float, float] | tuple[str, float, float, int, int]

ENGINE = {"schedule": "schedule", "update": "update_from_output",
          "bitmask": "get_grammar_bitmask"}
WORKER = {"execute": ("execute_model (V1)", "execute_model (V2)"),
          "sample": ("sample_tokens (V1)", "sample_tokens (V2)"),
          "host": ("sampled tokens on the host (V1)", "sampled tokens on the host (V2)")}
FIELDS = ("period", "period p90", "worker busy", "worker idle", "sample wait", "gpu tail", "back",
          "turnaround", "dispatch")


def _calls(entries: Iterable[Entry], *phases: str) -> list[tuple[float, float]]:
    return sorted((e[1], e[2]) for e in entries if e[0] in phases)


def _latest_before(times: list[float], t: float) -> float | None:
    """The latest of sorted `times` at or before t."""
    i = bisect.bisect_right(times, t)
    return times[i - 1] if i else None


def _first_after(times: list[float], t: float) -> float | None:
    i = bisect.bisect_left(times, t)
    return times[i] if i < len(times) else None


def _median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3 if values else float("nan")


def _steady(calls: list[tuple[float, float]], trim: float) -> list[tuple[float, float]]:
    """The calls without the batch's first and last `trim` share (ramp up, drain)."""
    cut = int(len(calls) * trim)
    return calls[cut:len(calls) - cut]


def critical_path(engine: list[Entry], worker: list[Entry], trim: float = 0.1,
                  keep: Callable[[float], bool] | None = None) -> dict[str, float]:
    """Milliseconds, median over a batch's steady steps, of FIELDS: the step (`period`,
    between update_from_output starts; and its 90th percentile), the worker's host work
    a step and its idle time before the next, and the legs of the ring (module doc).
    With `keep`, only the steps it keeps count (by the time a sampling ends, an update
    starts, a period begins)."""
    keep = keep or (lambda _: True)
    schedules = _calls(engine, ENGINE["schedule"])
    updates = _steady(_calls(engine, ENGINE["update"]), trim)
    executes = _calls(worker, *WORKER["execute"])
    samples = _calls(worker, *WORKER["sample"])
    on_host = _calls(worker, *WORKER["host"])
    steady_samples = _steady(samples, trim)
    if len(steady_samples) < 2 or len(updates) < 2:
        return dict.fromkeys(FIELDS, float("nan"))
    first, last = steady_samples[0][0], steady_samples[-1][1]
    execute_starts = [s for s, _ in executes]
    sample_ends = [e for _, e in samples]
    schedule_ends = [e for _, e in schedules]
    host_ends = [e for _, e in on_host]

    busy, idle, sample_wait, dispatch = [], [], [], []
    for start, end in steady_samples:
        if not keep(end):
            continue
        i = bisect.bisect_right(execute_starts, start) - 1
        previous = _latest_before(sample_ends, start)
        if i < 0 or previous is None or previous > execute_starts[i]:
            continue  # (the batch's first sampling, or an execute without one)
        execute_start, execute_end = executes[i]
        busy.append(execute_end - execute_start + end - start)
        idle.append(end - previous - busy[-1])
        sample_wait.append(start - execute_end)
        sent = _latest_before(schedule_ends, execute_start)
        if sent is not None:
            dispatch.append(execute_start - sent)
    # The k-th sampling's tokens are the output thread's k-th (in order, one each).
    tail = [host_end - sample_end for (_, sample_end), (_, host_end)
            in zip(samples, on_host, strict=False)
            if first <= sample_end <= last and keep(sample_end)]
    back, turnaround = [], []
    for start, _ in updates:
        if not keep(start):
            continue
        came = _latest_before(host_ends, start)
        if came is not None:
            back.append(start - came)
        scheduled = _first_after(schedule_ends, start)
        if scheduled is not None:
            turnaround.append(scheduled - start)
    periods = sorted(b - a for a, b in itertools.pairwise(s for s, _ in updates) if keep(a))
    return {"period": _median_ms(periods),
            "period p90": periods[int(0.9 * (len(periods) - 1))] * 1e3 if periods
            else float("nan"),
            "worker busy": _median_ms(busy), "worker idle": _median_ms(idle),
            "sample wait": _median_ms(sample_wait),
            "gpu tail": _median_ms(tail), "back": _median_ms(back),
            "turnaround": _median_ms(turnaround), "dispatch": _median_ms(dispatch)}


def by_process(timelines: dict[str, list[Entry]]) -> tuple[list[Entry], list[Entry]]:
    """(the engine core's entries, the worker's) of a server's processes' timelines: the
    one that schedules, and the one that runs the model (the first, with several)."""
    engine = next((t for t in timelines.values()
                   if any(e[0] == ENGINE["schedule"] for e in t)), [])
    worker = next((t for t in timelines.values()
                   if any(e[0] in WORKER["execute"] for e in t)), [])
    return engine, worker


def by_pace(engine: list[Entry], trim: float = 0.1) -> tuple[Callable, Callable]:
    """(keep the slowest third of a batch's steady steps, keep the fastest third), for
    `critical_path`: what the slow steps waited for that the fast ones did not."""
    starts = [s for s, _ in _steady(_calls(engine, ENGINE["update"]), trim)]
    steps = list(itertools.pairwise(starts))
    order = sorted(range(len(steps)), key=lambda i: steps[i][1] - steps[i][0])
    third = len(steps) // 3
    slow, fast = set(order[len(steps) - third:]), set(order[:third])

    def within(chosen: set[int]) -> Callable[[float], bool]:
        def keep(t: float) -> bool:
            i = bisect.bisect_right(starts, t) - 1
            return i in chosen and t < steps[i][1]
        return keep

    return within(slow), within(fast)


def widths(engine: list[Entry]) -> list[tuple[int, int]]:
    """Each step's (rows, tokens), in order; empty for a profile that did not record them."""
    steps = sorted(e for e in engine if e[0] == ENGINE["schedule"])
    return [(e[3], e[4]) for e in steps] if all(len(e) == 5 for e in steps) else []


def at_full_width(engine: list[Entry], around: int = 2) -> tuple[Callable, int]:
    """(keep the steps at the batch's full width, how many): where a batch's requests
    reach the engine over time, many of its steps run fewer rows than the batch has, or
    prompt tokens too. Kept: the steps that decoded the batch's widest set of rows and nothing
    else, with their `around` neighbours on either side doing the same (a step's legs
    span its neighbours). The k-th `update_from_output` is the k-th step's (in order)."""
    shapes = widths(engine)
    starts = [s for s, _ in _calls(engine, ENGINE["update"])]
    decode = [rows if rows == tokens else 0 for rows, tokens in shapes]
    widest = max(decode, default=0)
    full = {i for i in range(around, min(len(decode), len(starts)) - around)
            if widest and all(w == widest for w in decode[i - around:i + around + 1])}

    def keep(t: float) -> bool:
        i = bisect.bisect_right(starts, t) - 1
        return i in full and i + 1 < len(starts)
    return keep, len(full)


def full_width(engine: list[Entry], worker: list[Entry]) -> tuple[list[int], int, dict]:
    """(each step's rows, how many steps ran at the batch's full width, their legs: nan
    where none did)."""
    keep, steps = at_full_width(engine)
    legs = (critical_path(engine, worker, trim=0.0, keep=keep) if steps
            else dict.fromkeys(FIELDS, float("nan")))
    return [rows for rows, _ in widths(engine)], steps, legs


def main(argv: list[str] | None = None) -> int:
    """Each batch of a profile's `--timelines` file: every leg over all its steady steps,
    its slowest third and its fastest third."""
    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("timelines", help="bench.step_profile --timelines FILE.json.gz")
    args = parser.parse_args(argv)
    with gzip.open(args.timelines, "rt") as f:
        batches = json.load(f)
    print("| batch | rows a step: median (widest), steps at it | " + " | ".join(FIELDS)
          + " |")
    print("|---|---|" + "---|" * len(FIELDS))
    for batch in batches:
        engine, worker = by_process({pid: [tuple(e) for e in entries]
                                     for pid, entries in batch["processes"].items()})
        slow, fast = by_pace(engine)
        rows, at_full, on_full = full_width(engine, worker)
        legs = [critical_path(engine, worker, keep=keep) for keep in (None, slow, fast)]
        legs.append(on_full)
        shape = (f"{statistics.median(rows):.0f} ({max(rows)}), {at_full}" if rows
                 else "-")
        name = f"{batch['engine']} {batch['workload']} #{batch['repeat']}"
        print(f"| {name}: all / slowest third / fastest third / full width | {shape} | "
              + " | ".join(" / ".join(f"{leg[field]:.2f}" for leg in legs)
                           for field in FIELDS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
