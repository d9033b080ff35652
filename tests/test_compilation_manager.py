"""CompilationManager over a real process pool: dedupe, cache levels, timeouts, crashes."""

from __future__ import annotations

import contextlib
import mmap
import threading
import time

import psutil
import pytest

from dotllm.compiler import pool as compile_pool
from dotllm.compiler.cache import IndexCache
from dotllm.compiler.compiled import CompiledIndex
from dotllm.compiler.manager import CompilationManager
from dotllm.compiler.pool import CompileFailed, CompilePool, PoolLimits
from dotllm.compiler.spec import ConstraintError, ConstraintSpec

# A DFA with ~2^k states: far too slow to finish within a short timeout.
EXPLODING = ConstraintSpec.regex("[ab]*a[ab]{22}")
QUICK = ConstraintSpec.regex("[0-9]{1,3}")


def compile_workers() -> set[int]:
    """This process's compile workers (other fixtures' pools included)."""
    return {p.pid for p in psutil.Process().children()
            if "spawn_main" in " ".join(p.cmdline())}


@pytest.fixture
def new_worker():
    """The one compile worker a test's pool started."""
    before = compile_workers()

    def new_worker() -> psutil.Process:
        [pid] = compile_workers() - before
        return psutil.Process(pid)
    return new_worker


@pytest.fixture
def make_manager(vocabulary, tmp_path):
    made: list[CompilationManager] = []

    def make(workers=2, timeout_s=60.0, max_index_bytes=256 * 2**20, disk=True, memory=0):
        pool = CompilePool(vocabulary, workers=workers,
                           limits=PoolLimits(timeout_s=timeout_s, max_index_bytes=max_index_bytes,
                                             max_worker_memory_bytes=memory))
        cache = IndexCache(disk_dir=tmp_path / "cache" if disk else None)
        manager = CompilationManager(vocabulary, cache, pool)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.shutdown()


def test_one_compile_per_key_however_many_wait(make_manager):
    manager = make_manager()
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    # Same schema, other spellings: one canonical key.
    specs = [ConstraintSpec.json_schema(schema),
             ConstraintSpec.json_schema('{"properties": {"x": {"type": "integer"}},\n'
                                        ' "type": "object"}')] * 10
    futures = [manager.get(s) for s in specs]
    results = [f.result(timeout=120) for f in futures]
    assert all(r is results[0] for r in results)
    assert manager.stats["compiles"] == 1
    assert manager.stats["deduplicated"] + manager.stats["hit_memory"] == 19


def test_restart_serves_from_disk_with_zero_compiles(make_manager):
    first = make_manager()
    first.get(QUICK).result(timeout=120)
    assert first.stats["compiles"] == 1
    first.shutdown()  # a stop waits for the disk write behind the compile
    restarted = make_manager()
    restarted.get(QUICK).result(timeout=120)
    assert restarted.stats["compiles"] == 0 and restarted.stats["hit_disk"] == 1


def test_pool_compiles_as_many_at_once_as_it_has_workers(make_manager):
    manager = make_manager(workers=2, timeout_s=3)
    started = time.monotonic()
    futures = [manager.get(ConstraintSpec.regex(f"[ab]*a[ab]{{{n}}}")) for n in (22, 23)]
    for f in futures:
        with pytest.raises(CompileFailed):
            f.result(timeout=60)
    # Two 3 s timeouts side by side, not one after the other.
    assert time.monotonic() - started < 5.9


def test_timeout_kills_the_worker_and_the_pool_recovers(make_manager):
    manager = make_manager(workers=1, timeout_s=2)
    with pytest.raises(CompileFailed, match="longer than 2 s") as info:
        manager.get(EXPLODING).result(timeout=120)
    assert info.value.kind == "timeout"
    assert manager.pool.restarts == 1
    assert manager.get(QUICK).result(timeout=120).num_states > 0
    # Remembered: the same constraint fails at once, without a worker.
    started = time.monotonic()
    with pytest.raises(CompileFailed):
        manager.get(EXPLODING).result(timeout=5)
    assert time.monotonic() - started < 1
    assert manager.stats["compiles"] == 2


def test_a_worker_killed_once_mid_compile_costs_a_retry_not_a_failure(make_manager,
                                                                       new_worker):
    """Killed from outside mid-compile (the OOM killer, an operator): the compile is tried
    again on a fresh worker and succeeds. (One that kills its worker each time fails:
    test_compile_over_the_memory_cap_aborts_only_its_worker.)"""
    manager = make_manager(workers=1, timeout_s=120)
    manager.get(QUICK).result(timeout=120)
    worker = new_worker()
    future = manager.get(ConstraintSpec.regex("[ab]{0,6}a[ab]{14}"))  # ~3 s here
    while not (manager._queued and next(iter(manager._queued.values())).running()):
        time.sleep(0.01)
    time.sleep(0.3)  # sent to the worker, which compiles it
    worker.kill()
    assert future.result(timeout=120).num_states > 0
    assert manager.pool.restarts == 1 and manager.stats["failed_crash"] == 0


def test_a_worker_killed_while_idle_is_no_ones_fault(make_manager, new_worker):
    """Killed between compiles (an OOM kill, an operator): the next, unrelated constraint
    is compiled on a fresh worker, not told its worker died."""
    manager = make_manager(workers=1, timeout_s=120)
    manager.get(QUICK).result(timeout=120)
    idle = new_worker()
    idle.kill()
    idle.wait(timeout=10)
    assert manager.get(ConstraintSpec.regex("[uvw]{3}")).result(timeout=120).num_states > 0
    assert manager.stats["failed_crash"] == 0


def test_workers_start_with_the_pool_not_with_the_first_compile(make_manager, new_worker):
    """A worker takes seconds to start: a fresh server's first schema waited for it."""
    manager = make_manager(workers=1)
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(ValueError):  # none yet
            worker = new_worker()
            break
        assert time.monotonic() < deadline, "no compile worker started with the pool"
        time.sleep(0.05)
    assert worker.is_running() and manager.stats["compiles"] == 0


def test_a_worker_killed_as_it_starts_leaves_the_pool_serving(make_manager):
    """Killed before it had read what it starts with (an OOM kill at the wrong moment): the
    pool thread starting it once waited for good on a pipe it held both ends of."""
    before = compile_workers()
    killed: list[int] = []

    def kill_the_first_new_worker():
        deadline = time.monotonic() + 30
        while not killed and time.monotonic() < deadline:
            for pid in compile_workers() - before:
                psutil.Process(pid).kill()
                killed.append(pid)
                break

    killer = threading.Thread(target=kill_the_first_new_worker)
    killer.start()
    manager = make_manager(workers=1, timeout_s=120)
    first = manager.get(QUICK)
    killer.join()
    assert killed
    with contextlib.suppress(CompileFailed):  # its worker could not start: said at once
        first.result(timeout=60)
    assert manager.get(ConstraintSpec.regex("[xyz]{2}")).result(timeout=60).num_states > 0


def test_remembered_failures_expire(vocabulary, tmp_path):
    pool = CompilePool(vocabulary, workers=1, limits=PoolLimits(timeout_s=2))
    manager = CompilationManager(vocabulary, IndexCache(disk_dir=None), pool,
                                 failure_ttl_s=1.0)
    try:
        with pytest.raises(CompileFailed):
            manager.get(EXPLODING).result(timeout=60)
        with pytest.raises(CompileFailed):
            manager.get(EXPLODING).result(timeout=1)  # remembered: no compile
        assert manager.stats["compiles"] == 1
        time.sleep(1.1)
        with pytest.raises(CompileFailed):
            manager.get(EXPLODING).result(timeout=60)
        assert manager.stats["compiles"] == 2
    finally:
        manager.shutdown()


def test_a_compiled_index_comes_back_as_a_mapped_file(make_manager, vocabulary):
    """Not hundreds of reads of the connection, each waiting for the GIL behind the
    engine's step loop: the worker's in-memory file, mapped, holding the compile's bytes."""
    manager = make_manager()
    spec = ConstraintSpec.regex("[a-z]{30}")
    result = manager.pool.submit(spec).result(timeout=120)
    assert isinstance(result.data, mmap.mmap)
    assert result.data[:] == CompiledIndex.for_spec(spec, vocabulary).to_bytes()
    item = manager.get(spec).result(timeout=120)  # compiled again, kept, written behind
    assert manager.cache.flush(10)
    restarted = IndexCache(disk_dir=manager.cache.disk.directory)
    assert restarted.get(manager.key_for(spec))[0].num_states == item.num_states


def test_without_an_in_memory_file_the_bytes_come_through_the_connection(monkeypatch):
    data = b"compiled" * 1000
    fd = compile_pool.in_memory_file(data)
    assert compile_pool.mapped_file(fd, len(data))[:] == data

    def no_memfd(*args):
        raise OSError("no memfd here")
    monkeypatch.setattr(compile_pool.os, "memfd_create", no_memfd)
    assert compile_pool.in_memory_file(data) is None  # the worker sends `data` itself


def test_index_over_the_size_budget_is_refused(make_manager):
    manager = make_manager(max_index_bytes=1000)
    with pytest.raises(CompileFailed, match="over the 0 MiB limit") as info:
        manager.get(ConstraintSpec.regex("[a-z]{1,20}")).result(timeout=120)
    assert info.value.kind == "too_large"


def test_invalid_constraints_fail_without_a_compile(make_manager):
    manager = make_manager()
    with pytest.raises(ConstraintError):
        manager.get(ConstraintSpec.regex("(unclosed")).result(timeout=10)
    # Python's re accepts lookarounds; no engine here does (known before any compile).
    with pytest.raises(ConstraintError, match="look-around"):
        manager.get(ConstraintSpec.regex("a(?=b)")).result(timeout=120)
    assert manager.stats["compiles"] == 0


def test_compile_over_the_memory_cap_aborts_only_its_worker(make_manager):
    """outlines-core aborts the process when an allocation fails: the pool survives it."""
    manager = make_manager(workers=1, memory=150 * 2**20)
    with pytest.raises(CompileFailed, match="worker died") as info:
        manager.get(ConstraintSpec.json_object()).result(timeout=120)  # needs far more
    assert info.value.kind == "crash"
    assert manager.pool.restarts == 2  # tried again once on a fresh worker
    assert manager.get(QUICK).result(timeout=120).num_states > 0


def test_a_miss_is_known_before_its_compile_ends(make_manager):
    """`looked_up`: a request need not wait out a lookup timer to start on llguidance."""
    manager = make_manager(workers=1, timeout_s=3)
    slow = manager.get(EXPLODING)
    assert slow.looked_up.wait(10) and not slow.done()
    with pytest.raises(CompileFailed):
        slow.result(timeout=60)
    quick = manager.get(QUICK)
    quick.result(timeout=120)
    again = manager.get(QUICK)  # from memory: done, and looked up
    assert again.done() and again.looked_up.is_set()
    remembered = manager.get(EXPLODING)
    assert remembered.done() and remembered.looked_up.is_set()


def test_compile_workers_yield_the_cpu_to_the_engine(make_manager, new_worker):
    manager = make_manager(workers=1)
    manager.get(QUICK).result(timeout=120)
    worker = new_worker()
    assert worker.nice() >= psutil.Process().nice() + 10 or worker.nice() == 19


def test_a_queued_compile_no_one_waits_for_is_cancelled(make_manager):
    """Its requests went away (abandoned): it must not hold the queue. Not remembered as
    a failure, so the next request for it compiles it."""
    manager = make_manager(workers=1, timeout_s=3)
    busy = manager.get(EXPLODING)  # holds the only worker for 3 s
    while not manager._queued:
        time.sleep(0.01)
    orphan_spec = ConstraintSpec.regex("[pq]{4}")
    orphan, again = manager.get(orphan_spec), manager.get(orphan_spec)
    while len(manager._queued) < 2:
        time.sleep(0.01)
    manager.release(again, abandoned=True)  # another request still waits: kept
    assert manager.stats["cancelled"] == 0
    manager.release(orphan, abandoned=True)
    with pytest.raises(CompileFailed, match="cancelled") as info:
        orphan.result(timeout=10)
    assert info.value.kind == "cancelled" and manager.stats["cancelled"] == 1
    with pytest.raises(CompileFailed):
        busy.result(timeout=60)
    assert manager.get(orphan_spec).result(timeout=60).num_states > 0  # not remembered
    assert manager.stats["compiles"] == 3


def test_a_compile_its_request_finished_without_is_kept(make_manager):
    """A request that ended by itself (on llguidance) before its index came: the index
    is still worth having for the next request."""
    manager = make_manager(workers=1)
    future = manager.get(ConstraintSpec.regex("[rs]{5}"))
    manager.release(future, abandoned=False)
    assert future.result(timeout=60).num_states > 0 and manager.stats["cancelled"] == 0


def test_a_compile_a_request_is_blocked_on_goes_first(make_manager):
    """Queued behind compiles that only move requests onto their index (they run on
    llguidance meanwhile), the one a request waits for is hurried ahead of them."""
    manager = make_manager(workers=1, timeout_s=3)
    busy = manager.get(EXPLODING)  # holds the only worker for 3 s
    while not manager._queued:
        time.sleep(0.01)
    done: list[str] = []
    futures = {name: manager.get(ConstraintSpec.regex(name))
               for name in ("[ab]{3}", "[cd]{3}", "[ef]{3}")}
    while len(manager._queued) < 4:
        time.sleep(0.01)
    # The order the pool ran them in (the requests' futures resolve in threads of their
    # own, which a loaded machine may run in any order).
    for name, future in futures.items():
        manager._queued[future.key].add_done_callback(lambda _, name=name: done.append(name))
    manager.hurry(futures["[ef]{3}"])  # its request cannot start without it
    for future in futures.values():
        future.result(timeout=60)
    # The other two in the order their lookups reached the pool (each in a thread of its
    # own: on a loaded machine [cd] once got there first, CI 2026-12-07).
    assert done[0] == "[ef]{3}" and sorted(done[1:]) == ["[ab]{3}", "[cd]{3}"]
    with pytest.raises(CompileFailed):
        busy.result(timeout=60)


def test_a_compile_hurried_before_it_is_queued_is_queued_urgent(make_manager):
    manager = make_manager(workers=1, timeout_s=3)
    busy = manager.get(EXPLODING)
    while not manager._queued:
        time.sleep(0.01)
    later = manager.get(ConstraintSpec.regex("[gh]{3}"))
    urgent = manager.get(ConstraintSpec.regex("[ij]{3}"))
    manager.hurry(urgent)  # perhaps before its cache lookup is over: still first
    order = []
    for future, name in ((later, "later"), (urgent, "urgent")):
        future.add_done_callback(lambda _, name=name: order.append(name))
    later.result(timeout=60)
    urgent.result(timeout=60)
    assert order == ["urgent", "later"]
    with pytest.raises(CompileFailed):
        busy.result(timeout=60)
