"""`CompilationManager`: one compiled index per canonical constraint, however many ask.

A request's constraint is looked up in the cache (memory, disk, remote); on a miss it is
compiled once in the process pool, while every other request for the same key waits on
the same Future. A constraint that failed to compile (invalid, too large, too slow, or
crashed its worker twice) is remembered for a while (`failure_ttl_s`), so the same bad
input does not cost a compile, or a worker, on every request, and a failure the server
caused (a loaded machine timing a compile out) does not stay with a schema for good.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor

from dotllm.compiler.cache import IndexCache, cache_key
from dotllm.compiler.compiled import CompiledIndex
from dotllm.compiler.metrics import CompileMetrics
from dotllm.compiler.pool import CompileFailed, CompilePool
from dotllm.compiler.spec import ConstraintError, ConstraintSpec
from dotllm.compiler.vocabulary import Vocabulary

logger = logging.getLogger(__name__)

_MAX_REMEMBERED = 4096  # failures and compile times kept, most recent first
_FLUSH_AT_SHUTDOWN_S = 10.0  # a clean stop waits this long for the disk and remote writes


class IndexFuture(Future):
    """Future[CompiledIndex] that also tells when the cache lookup is over: after
    `looked_up` is set and the future is not done, the index is being compiled.
    `waiters` counts the requests that asked for it and have not released it; `urgent`,
    whether one of them is blocked on it (its compile goes first)."""

    def __init__(self):
        super().__init__()
        self.looked_up = threading.Event()
        self.waiters = 1
        self.key: str | None = None
        self.urgent = False


class CompilationManager:
    def __init__(self, vocabulary: Vocabulary, cache: IndexCache, pool: CompilePool,
                 metrics: CompileMetrics | None = None, failure_ttl_s: float = 600.0):
        self.vocabulary = vocabulary
        self.cache = cache
        self.pool = pool
        self.metrics = metrics
        self.stats: Counter[str] = Counter()
        self.compile_seconds: OrderedDict[str, float] = OrderedDict()  # key -> worker time
        self._inflight: dict[str, IndexFuture] = {}
        self._queued: dict[str, Future] = {}  # key -> its pool job, while not done
        self._failures: OrderedDict[str, tuple[Exception, float]] = OrderedDict()
        self.failure_ttl_s = failure_ttl_s
        self._lock = threading.Lock()
        # Lookups wait on disk, remote stores and the pool: threads, not CPU.
        self._lookups = ThreadPoolExecutor(max_workers=32, thread_name_prefix="dotllm-lookup")
        cache.observers.append(self._on_cache_event)
        if metrics:
            self._sample_cache_bytes()

    def key_for(self, spec: ConstraintSpec) -> str:
        return cache_key(self.vocabulary.digest, spec.key)

    def get(self, spec: ConstraintSpec) -> IndexFuture:
        """The index, or its exception: a ConstraintError or CompileFailed."""
        key = self.key_for(spec)
        if self.metrics:
            self.metrics.requests.inc()
        with self._lock:
            if (failure := self._failures.get(key)) is not None:
                error, until = failure
                if time.monotonic() < until:
                    self.stats["remembered_failure"] += 1
                    return _done(exception=error)
                del self._failures[key]
            if (item := self.cache.get_from_memory(key)) is not None:
                return _done(result=item)
            if (future := self._inflight.get(key)) is not None:
                self.stats["deduplicated"] += 1
                future.waiters += 1
                if self.metrics:
                    self.metrics.deduplicated.inc()
                return future
            future = self._inflight[key] = IndexFuture()
            future.key = key
        self._lookups.submit(self._resolve, key, spec, future)
        return future

    def release(self, future: Future, abandoned: bool) -> None:
        """A request no longer wants `future`'s index. If it was `abandoned` (the request
        ended before it was done: its client went away, or it hit max_tokens) and no
        other request waits for it, a compile still queued is cancelled: it must not
        hold the queue for no one. A compile already running finishes and is cached."""
        if not isinstance(future, IndexFuture) or future.key is None:
            return
        with self._lock:
            future.waiters -= 1
            if future.waiters > 0 or not abandoned or future.done():
                return
            queued = self._queued.get(future.key)
            if queued is not None and queued.cancel():
                self.stats["cancelled"] += 1
                if self.metrics:
                    self.metrics.cancelled.inc()
                # A request asking from now on starts a compile of its own.
                if self._inflight.get(future.key) is future:
                    del self._inflight[future.key]

    def hurry(self, future: Future) -> None:
        """A request is blocked on `future` (no other engine can serve it meanwhile): its
        compile goes before those that only move requests onto their index."""
        if not isinstance(future, IndexFuture) or future.done():
            return
        with self._lock:
            future.urgent = True
            if future.key is not None and (queued := self._queued.get(future.key)):
                self.pool.hurry(queued)

    def _resolve(self, key: str, spec: ConstraintSpec, future: IndexFuture) -> None:
        try:
            item, _ = self.cache.get(key)
            if item is None:
                future.looked_up.set()
                item = self._compile(key, spec, future)
            future.set_result(item)
        except CancelledError:  # not the constraint's failure: not remembered
            future.set_exception(CompileFailed("the compile was cancelled: no request "
                                               "waited for it any more", "cancelled"))
        except (ConstraintError, CompileFailed) as e:
            self._remember_failure(key, e)
            future.set_exception(e)
        except Exception as e:
            logger.exception("constraint lookup failed")
            future.set_exception(CompileFailed(f"compiling the constraint failed: {e}", "crash"))
        finally:
            future.looked_up.set()
            with self._lock:
                if self._inflight.get(key) is future:
                    del self._inflight[key]

    def _compile(self, key: str, spec: ConstraintSpec, wanted: IndexFuture) -> CompiledIndex:
        spec.check()
        if (refusal := spec.outlines_refusal()) is not None:
            raise ConstraintError(refusal)
        self.stats["compiles"] += 1
        if self.metrics:
            self.metrics.compiles.inc()
        with self._lock:  # a hurry() comes before or after this, never between
            future = self.pool.submit(spec, urgent=wanted.urgent)
            self._queued[key] = future
        self._sample_queue_length()
        started = time.monotonic()
        try:
            result = future.result()
        except CompileFailed as e:
            logger.info("compile %s: %s after %.1f s (%s)", key[:12], e.kind,
                        time.monotonic() - started, e)
            raise
        finally:
            with self._lock:
                if self._queued.get(key) is future:
                    del self._queued[key]
            self._sample_queue_length()
        _remember(self.compile_seconds, key, result.seconds)
        item = CompiledIndex.from_buffer(result.data)
        logger.info("compile %s: done in %.2f s (%d states, %.1f MiB)", key[:12],
                    result.seconds, item.num_states, len(result.data) / 2**20)
        self.cache.put(key, item, result.data)
        if self.metrics:  # (observed once the index is in the cache: a compile counted
            # as finished is one the next request finds)
            self.metrics.compile_seconds.observe(result.seconds)
            self._sample_cache_bytes()
        return item

    def _sample_cache_bytes(self) -> None:
        self.metrics.cache_bytes.labels(level="memory").set(self.cache.memory.nbytes)
        self.metrics.pending_write_bytes.set(self.cache.pending_write_bytes)
        if self.cache.disk is not None:
            self.metrics.cache_bytes.labels(level="disk").set(self.cache.disk.nbytes)

    def _sample_queue_length(self) -> None:
        if self.metrics:
            self.metrics.queue_length.set(self.pool.queue_length)

    def _on_cache_event(self, event: str, level: str) -> None:
        self.stats[f"{event}_{level}"] += 1
        if self.metrics is None:
            return
        if event == "hit":
            self.metrics.cache_hits.labels(level=level).inc()
            self._sample_cache_bytes()
        elif event == "stored":
            self._sample_cache_bytes()
        elif event == "corrupt":
            self.metrics.corrupt_entries.labels(level=level).inc()

    def _remember_failure(self, key: str, error: Exception) -> None:
        kind = getattr(error, "kind", "invalid")
        self.stats[f"failed_{kind}"] += 1
        if self.metrics:
            self.metrics.failures.labels(reason=kind).inc()
        with self._lock:
            _remember(self._failures, key, (error, time.monotonic() + self.failure_ttl_s))

    def shutdown(self) -> None:
        self._lookups.shutdown(wait=False, cancel_futures=True)
        self.pool.shutdown()
        if not self.cache.flush(_FLUSH_AT_SHUTDOWN_S):  # what was compiled stays compiled
            logger.warning("index cache: writes still pending at shutdown were dropped")


def _remember(bounded: OrderedDict, key: str, value) -> None:
    bounded[key] = value
    while len(bounded) > _MAX_REMEMBERED:
        bounded.popitem(last=False)


def _done(result=None, exception: Exception | None = None) -> IndexFuture:
    future = IndexFuture()
    future.looked_up.set()
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)
    return future
