"""bench.step_timeline's reading of a step's legs, and bench.step_profile's timeline: every
call of the timed phases kept with its start and end, dumped for the window the driver
asks for."""

from __future__ import annotations

import gzip
import json
import math
import threading
import time
import types

import pytest

from bench import step_profile, step_timeline

MS = 1e-3


def _ring(steps: int, slow_every: int = 0, shapes=None) -> tuple[list, list]:
    """A steady batch queue of two, in ms from each step's base: the engine core schedules
    at 0-0.7; the worker executes at 0.8-2.4 and samples at 2.45-3.15; the output thread
    has the tokens at 4.05; the engine core accepts them from 4.25. A step is 3 ms, every
    `slow_every`-th one 6 (it starts later: the worker waits the longer). `shapes`: each
    step's (rows, tokens), kept with its schedule."""
    engine, worker = [], []
    base = 0.0
    for k in range(steps):
        base += 6.0 if slow_every and k % slow_every == 0 else 3.0

        def at(phase, start, end, into, base=base, *shape):
            into.append((phase, (base + start) * MS, (base + end) * MS, *shape))

        at("schedule", 0, 0.7, engine, base, *(shapes[k] if shapes else ()))
        at("execute_model (V2)", 0.8, 2.4, worker)
        at("sample_tokens (V2)", 2.45, 3.15, worker)
        at("sampled tokens on the host (V2)", 3.2, 4.05, worker)
        at("update_from_output", 4.25, 4.65, engine)
    return engine, worker


def _report_row(tmp_path, capsys, engine: list, worker: list) -> str:
    """bench.step_timeline's row for a profile's --timelines file of one batch."""
    path = tmp_path / "timelines.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump([{"engine": "dotllm", "workload": "free", "repeat": 0, "pinned": False,
                    "processes": {"1": engine, "2": worker}}], f)
    assert step_timeline.main([str(path)]) == 0
    return capsys.readouterr().out.splitlines()[-1]


def test_each_leg_of_a_steady_ring_is_read_where_it_was_put():
    engine, worker = _ring(50, slow_every=5)
    path = step_timeline.critical_path(engine, worker)
    expected = {"period": 3.0, "period p90": 6.0, "worker busy": 2.3, "worker idle": 0.7,
                "sample wait": 0.05, "gpu tail": 0.9, "back": 0.2, "dispatch": 0.1,
                "turnaround": 2.45}  # (the next schedule to end: step k+2's, at 6.7)
    assert set(path) == set(step_timeline.FIELDS)
    for leg, ms in expected.items():
        assert path[leg] == pytest.approx(ms, abs=1e-6), leg


def test_the_processes_entries_come_in_any_order_and_a_short_batch_reads_nothing():
    engine, worker = _ring(50)
    shuffled = step_timeline.critical_path(engine[::-1], worker[::-1])
    assert shuffled == step_timeline.critical_path(engine, worker)
    assert all(math.isnan(v) for v in step_timeline.critical_path(*_ring(1)).values())


def test_the_engine_core_and_the_worker_are_told_apart_by_their_phases():
    engine, worker = _ring(5)
    found = step_timeline.by_process({"7": worker, "3": engine, "9": [("other", 0, 1)]})
    assert found == (engine, worker)


def test_timed_calls_are_kept_and_dumped_for_the_window_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(step_profile, "_timeline", type(step_profile._timeline)(maxlen=100))
    monkeypatch.setattr(step_profile, "_totals", {})
    schedule = step_profile._timed("schedule", lambda: time.sleep(0.002))
    accept = step_profile._timed("accept_tokens", lambda: None)  # totals only
    before = time.monotonic()
    schedule()
    accept()
    schedule()
    after = time.monotonic()
    schedule()  # outside the window
    assert step_profile._totals["schedule"][0] == 3
    assert step_profile._totals["accept_tokens"][0] == 1
    (tmp_path / "1234.json").write_text(json.dumps({"phases": {}}))  # a profiled process

    def answer():  # the process's writer thread, as the driver waits
        time.sleep(0.3)
        step_profile._dump_timeline(tmp_path, "", 1234)

    writer = threading.Thread(target=answer)
    writer.start()
    timelines = step_profile.read_timelines(tmp_path, before, after, "first")
    writer.join()
    entries = timelines["1234"]
    assert [phase for phase, _, _ in entries] == ["schedule", "schedule"]
    assert all(before <= start < end <= after for _, start, end in entries)
    assert entries[0][2] - entries[0][1] >= 0.002
    # Asked once, dumped once: the same window is not written again.
    assert step_profile._dump_timeline(tmp_path, "first", 1234) == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "1234.json", "1234.timeline", step_profile.TIMELINE_WINDOW]


def test_the_slow_steps_legs_are_read_apart_from_the_fast_ones(tmp_path, capsys):
    engine, worker = _ring(60, slow_every=5)  # every fifth step 3 ms later
    slow, fast = step_timeline.by_pace(engine)
    on_slow = step_timeline.critical_path(engine, worker, keep=slow)
    on_fast = step_timeline.critical_path(engine, worker, keep=fast)
    assert on_fast["period"] == pytest.approx(3.0) and on_slow["period"] == pytest.approx(6.0)
    # What the slow steps waited for: the worker idle (the step came later), nothing else.
    assert on_fast["worker idle"] == pytest.approx(0.7)
    assert on_slow["worker idle"] == pytest.approx(3.7)
    for leg in ("worker busy", "gpu tail", "back", "dispatch"):
        assert on_slow[leg] == pytest.approx(on_fast[leg]), leg
    # From a profile's --timelines file, a row a batch.
    row = _report_row(tmp_path, capsys, engine, worker)
    assert row.startswith("| dotllm free #0: all / slowest third / fastest third / full "
                          "width | - | 3.00 / 6.00 / 3.00 / nan |")


def test_the_steps_at_the_batchs_full_width_are_read_apart(tmp_path, capsys):
    # Requests arriving over time: 20 steps that take in prompts as the batch widens,
    # 30 at its full 16 rows decoding only, then 10 as it drains; every third step slower.
    shapes = ([(1 + k // 2, 1 + k // 2 + 7) for k in range(20)] + [(16, 16)] * 30
              + [(16 - k, 16 - k) for k in range(1, 11)])
    engine, worker = _ring(60, slow_every=3, shapes=shapes)
    assert step_timeline.widths(engine) == shapes
    full, at_full = step_timeline.at_full_width(engine)
    assert at_full == 30 - 4  # two neighbours either side at full width too
    legs = step_timeline.critical_path(engine, worker, trim=0.0, keep=full)
    every = step_timeline.critical_path(engine, worker)
    assert legs["period"] == pytest.approx(3.0) and legs["period p90"] == pytest.approx(6.0)
    assert every["period"] == pytest.approx(3.0)
    # A profile without the shapes has no full-width view.
    assert step_timeline.at_full_width(_ring(60)[0])[1] == 0
    row = _report_row(tmp_path, capsys, engine, worker)
    assert row.startswith("| dotllm free #0: all / slowest third / fastest third / full "
                          "width | 16 (16), 26 | 3.00 / 6.00 / 3.00 / 3.00 |")


def test_a_profiled_schedule_keeps_its_steps_width():
    scheduled = types.SimpleNamespace(num_scheduled_tokens={"a": 1, "b": 1, "c": 9},
                                      total_num_scheduled_tokens=11)
    assert step_profile._shape(scheduled) == (3, 11)
    assert step_profile._shape(None) == ()  # (a call that raised)
