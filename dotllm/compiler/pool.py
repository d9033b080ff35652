"""A pool of compile processes that can really be stopped.

outlines-core builds an index single-threaded while holding the GIL, and its release
build aborts the whole process on a panic or a failed allocation. So each compile
runs in a worker process of its own: a compile past its time is stopped by killing that
worker (a thread cannot be stopped), a worker that dies fails only the compile it was
running, and either way a fresh worker takes its place. Each worker holds the vocabulary,
sent once when it starts.

Compiles wait in order of need: one a request is blocked on (`hurry`) goes before those
that only move a request already served by llguidance onto its index.

A compiled index (up to hundreds of MB) comes back as an in-memory file (memfd) whose
descriptor crosses the connection, mapped here: read through the connection it took
hundreds of reads, each waiting for the GIL behind the engine's busy step loop (38 MiB:
1.06 s with a busy Python thread beside the reader, 0.10 s without, on this project's CPU).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import mmap
import multiprocessing
import os
import pickle
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing import reduction

from dotllm.compiler.compiled import CompiledIndex
from dotllm.compiler.spec import ConstraintError, ConstraintSpec
from dotllm.compiler.vocabulary import Vocabulary

_WORKER_NICENESS = 10  # added to the compile workers' scheduling niceness
CRASH_RETRIES = 1  # times a compile whose worker died is tried again on a fresh one

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileResult:
    data: bytes | mmap.mmap  # CompiledIndex.to_bytes(), or a read-only map of them
    seconds: float  # compile time in the worker, queueing excluded


class _IdleWorkerGone(Exception):
    """The worker was gone before the compile reached it (killed while idle)."""


class CompileFailed(Exception):
    """A compile did not produce an index; the message says why in words a client can read."""

    def __init__(self, reason: str, kind: str):
        super().__init__(reason)
        self.kind = kind  # "invalid", "timeout", "too_large", "crash", "cancelled"


@dataclass(frozen=True)
class PoolLimits:
    timeout_s: float = 60.0
    max_index_bytes: int = 256 * 2**20
    # Address space a compile may add to a ready worker (0: no limit); past it,
    # outlines-core's allocation fails and that worker dies, not the machine.
    max_worker_memory_bytes: int = 0


def _cap_address_space(extra_bytes: int) -> None:
    """Limit this process to what it maps now plus `extra_bytes` (Linux)."""
    import resource

    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (mapped + extra_bytes, mapped + extra_bytes))


def _worker_main(conn, limits: PoolLimits) -> None:
    # Compiles are background work (requests decode on llguidance meanwhile): on a busy
    # host the engine's own threads, which every running request waits on, go first.
    os.nice(_WORKER_NICENESS)
    try:
        vocabulary: Vocabulary = pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):  # the parent went away
        return
    vocabulary.encoder()  # the tokenizer, loaded before the cap and the first compile
    if limits.max_worker_memory_bytes:
        _cap_address_space(limits.max_worker_memory_bytes)
    conn.send(("ready",))
    while True:
        try:
            spec: ConstraintSpec = conn.recv()
        except (EOFError, OSError):  # the parent went away
            return
        started = time.perf_counter()
        try:
            compiled = CompiledIndex.for_spec(spec, vocabulary)
        except ConstraintError as e:
            conn.send(("error", "invalid", str(e)))
            continue
        except ValueError as e:  # outlines-core's word for a regex it cannot build
            conn.send(("error", "invalid", f"cannot compile constraint: {e}"))
            continue
        data = compiled.to_bytes()
        if len(data) > limits.max_index_bytes:
            conn.send(("error", "too_large",
                       f"compiled constraint needs {len(data) / 2**20:.0f} MiB, over the "
                       f"{limits.max_index_bytes / 2**20:.0f} MiB limit"))
            continue
        seconds = time.perf_counter() - started
        if (fd := in_memory_file(data)) is None:
            conn.send(("ok", data, seconds))
            continue
        try:
            conn.send(("ok-fd", len(data), seconds))
            reduction.send_handle(conn, fd, os.getppid())
        finally:
            os.close(fd)


def in_memory_file(data: bytes) -> int | None:
    """A descriptor of an anonymous in-memory file holding `data`; None where there is
    none to be had (no memfd on this platform, no memory for it)."""
    try:
        fd = os.memfd_create("dotllm-index", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        return None
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
    except OSError:
        os.close(fd)
        return None
    return fd


def mapped_file(fd: int, size: int) -> mmap.mmap:
    """A read-only map of the file `fd`, which is closed (the map keeps the file)."""
    try:
        return mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)


class _Worker:
    def __init__(self, ctx, vocabulary_blob: bytes, limits: PoolLimits):
        self.conn, child = ctx.Pipe()
        # The vocabulary (megabytes) goes over the connection, not in the process's
        # arguments: `start()` writes those whole to a pipe whose reading end it still
        # holds, so a worker killed before reading them hung its pool thread for good.
        self.process = ctx.Process(target=_worker_main, args=(child, limits),
                                   daemon=True, name="dotllm-compile")
        self.process.start()
        child.close()
        with contextlib.suppress(OSError):  # it died first: `wait_ready` says so
            self.conn.send_bytes(vocabulary_blob)

    def wait_ready(self, timeout_s: float) -> None:
        try:
            if self.conn.poll(timeout_s):
                self.conn.recv()
                return
        except (EOFError, OSError):
            pass
        self.process.join(timeout=1)
        raise CompileFailed(
            f"a compile worker could not start (exit code {self.process.exitcode})", "crash")

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)
        self.conn.close()


@dataclass
class _Slot:
    worker: _Worker | None = None


URGENT, BACKGROUND, _STOP = 0, 1, 2  # queue priorities, first served first


class _Jobs:
    """The compiles waiting for a worker, most urgent first, then first come. A job
    hurried is queued again ahead; whichever of its entries comes out first runs it."""

    def __init__(self):
        self._heap: list[tuple[int, int, list]] = []
        self._order = itertools.count()
        self._ready = threading.Condition()
        self._waiting: dict[int, list] = {}  # id(future) -> job [spec, future], while queued

    def __len__(self) -> int:
        with self._ready:
            return len(self._waiting)

    def put(self, job: list | None, priority: int) -> None:
        with self._ready:
            heapq.heappush(self._heap, (priority, next(self._order), job))
            if job is not None:
                self._waiting[id(job[1])] = job
            self._ready.notify()

    def hurry(self, future: Future) -> None:
        with self._ready:
            if (job := self._waiting.get(id(future))) is not None:
                heapq.heappush(self._heap, (URGENT, next(self._order), job))
                self._ready.notify()

    def get(self) -> list | None:
        with self._ready:
            while True:
                while not self._heap:
                    self._ready.wait()
                job = heapq.heappop(self._heap)[2]
                if job is None or self._waiting.pop(id(job[1]), None) is not None:
                    return job


class CompilePool:
    """`submit(spec)` -> Future[CompileResult]; at most `workers` compiles at once.

    The regex is built in the worker too: for some schemas that alone takes minutes.
    """

    def __init__(self, vocabulary: Vocabulary, workers: int = 2, limits: PoolLimits | None = None,
                 start_timeout_s: float = 120.0):
        self.limits = limits or PoolLimits()
        self._ctx = multiprocessing.get_context("spawn")
        self._blob = pickle.dumps(vocabulary)
        self._start_timeout_s = start_timeout_s
        self._jobs = _Jobs()
        self._closed = False
        self.restarts = 0
        self._threads = [
            threading.Thread(target=self._serve, name=f"dotllm-compile-{i}", daemon=True)
            for i in range(max(1, workers))
        ]
        for t in self._threads:
            t.start()

    @property
    def queue_length(self) -> int:
        return len(self._jobs)

    def submit(self, spec: ConstraintSpec, urgent: bool = False) -> Future:
        """A compile, queued behind the urgent ones, or among them if `urgent`."""
        if self._closed:
            raise RuntimeError("compile pool is shut down")
        future: Future = Future()
        self._jobs.put([spec, future], URGENT if urgent else BACKGROUND)
        return future

    def hurry(self, future: Future) -> None:
        """A request now waits for this compile: ahead of those no request waits for."""
        self._jobs.hurry(future)

    def shutdown(self) -> None:
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None, _STOP)
        for t in self._threads:
            t.join(timeout=30)

    def _start_worker(self) -> _Worker:
        worker = _Worker(self._ctx, self._blob, self.limits)
        try:
            worker.wait_ready(self._start_timeout_s)
        except CompileFailed:
            worker.stop()
            raise
        return worker

    def _serve(self) -> None:
        slot = _Slot()  # this thread's worker
        try:
            # Started with the pool, not by the first compile: a worker takes seconds to
            # start (2-3 s on 2 cores), which the first schema of a fresh server waited for.
            try:
                slot.worker = self._start_worker()
            except Exception as e:  # the first compile starts one again, or says why not
                logger.warning("a compile worker did not start with the pool: %s", e)
            while (job := self._jobs.get()) is not None:
                spec, future = job
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    future.set_result(self._compile(slot, spec))
                except CompileFailed as e:
                    future.set_exception(e)
                except Exception as e:  # never leave a waiter hanging
                    logger.exception("compile pool error")
                    future.set_exception(CompileFailed(f"compile failed: {e}", "crash"))
                    self._replace_worker(slot)
        finally:
            if slot.worker is not None:
                slot.worker.stop()

    def _replace_worker(self, slot: _Slot) -> None:
        if slot.worker is not None:
            slot.worker.stop()
            slot.worker = None
            self.restarts += 1

    def _compile(self, slot: _Slot, spec: ConstraintSpec) -> CompileResult:
        """One compile; a worker that dies during it is replaced and the compile tried
        again (`CRASH_RETRIES`): killed from outside, it succeeds the second time; a
        compile that kills its worker every time is then its own failure. A worker that
        died before the compile began (killed while idle) is not this compile's fault."""
        crashes = 0
        while True:
            if slot.worker is not None and not slot.worker.process.is_alive():
                self._replace_worker(slot)
            if slot.worker is None:
                slot.worker = self._start_worker()
            try:
                return self._run(slot.worker, spec)
            except _IdleWorkerGone:
                self._replace_worker(slot)
            except CompileFailed as e:
                if e.kind in ("timeout", "crash"):
                    self._replace_worker(slot)
                if e.kind != "crash" or crashes >= CRASH_RETRIES:
                    raise
                crashes += 1
                logger.warning("a compile worker died compiling a constraint; trying again")

    def _run(self, worker: _Worker, spec: ConstraintSpec) -> CompileResult:
        try:
            worker.conn.send(spec)
        except OSError:
            raise _IdleWorkerGone() from None
        try:
            if not worker.conn.poll(self.limits.timeout_s):
                raise CompileFailed(
                    f"compiling the constraint took longer than {self.limits.timeout_s:g} s",
                    "timeout")
            reply = worker.conn.recv()
            if reply[0] == "ok-fd":
                reply = ("ok", mapped_file(reduction.recv_handle(worker.conn), reply[1]), reply[2])
        except (EOFError, OSError):
            worker.process.join(timeout=1)
            code = worker.process.exitcode
            raise CompileFailed(
                f"the compile worker died (exit code {code}) compiling this constraint "
                f"{CRASH_RETRIES + 1} times", "crash") from None
        if reply[0] == "ok":
            return CompileResult(reply[1], reply[2])
        raise CompileFailed(reply[2], reply[1])
