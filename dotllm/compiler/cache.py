"""Compiled indexes kept in memory, on disk and in a remote store, each filling those above.

- memory: ready `CompiledIndex` objects, bounded in bytes, the small and the often used
  kept first (`MemoryCache`);
- disk: one file per key in a directory, written atomically (temp file + rename), used
  in place through a read-only memory map (files are replaced, never rewritten), bounded
  in bytes: after each write the least recently used entries go (a hit touches its
  file). Safe beside other servers sharing the directory: an entry another process has
  mapped stays readable after it is unlinked, and one deleted before it is opened is a
  miss;
- remote: any fsspec URL (a shared directory, s3://bucket/prefix, ...), so replicas behind
  a load balancer compile each schema once between them.

A compiled entry goes to memory at once and to the disk and remote levels behind the
request that waits for it, on one writer thread: the write (a 40 MB index's fsync, 40-120
ms on this project's CPU; a remote store's upload, seconds) is not the request's to wait
for. Until written it stays readable here even if memory evicts it; `flush` waits for
the writes.

Entries are `CompiledIndex.to_bytes()`; one that fails its checksum or is truncated is
logged, deleted and reported as a miss, so it is recompiled rather than served; one
whose block fails later, in use, is dropped from every level. Keys already include the
vocabulary and the outlines-core version (`cache_key`). Observers see every lookup's
outcome as (event, level): ("hit", level), ("corrupt", level), ("miss", "all"), and
each write behind as ("stored", level).
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import importlib.metadata
import itertools
import logging
import mmap
import os
import queue
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dotllm.compiler.compiled import FORMAT_VERSION, CompiledIndex, CorruptEntry

logger = logging.getLogger(__name__)

OUTLINES_CORE_VERSION = importlib.metadata.version("outlines_core")


def cache_key(vocabulary_digest: str, spec_key: str) -> str:
    text = f"{FORMAT_VERSION}|{OUTLINES_CORE_VERSION}|{vocabulary_digest}|{spec_key}"
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class _Held:
    item: CompiledIndex
    hits: int
    priority: float
    serial: int


class MemoryCache:
    """Ready indexes, bounded in bytes. What goes first when full is chosen by
    GreedyDual-Size-Frequency (Squid's `heap GDSF`): the least `age + hits / MiB`, the
    age rising to each evicted entry's value. Index sizes span 1,000x (2-6 MiB for most
    real schemas, 70-180 MiB for a few with long free strings), and an LRU over a set of
    schemas in use larger than the bound missed on every request (128 Glaiveai2K and
    Github_easy schemas in turn, 1.4 GiB, against 1 GiB: each a disk read, ~10x the warm
    request's engine work); this keeps the many small ones and lets a rarely used large one
    go. Entries alike in size and use go least recently used first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: dict[str, _Held] = {}
        self._heap: list[tuple[float, int, str]] = []  # stale records skipped on pop
        self._age = 0.0
        self._serials = itertools.count()
        self._lock = threading.Lock()

    def get(self, key: str) -> CompiledIndex | None:
        with self._lock:
            held = self._items.get(key)
            if held is None:
                return None
            held.hits += 1
            self._queue(key, held)
            return held.item

    def put(self, key: str, item: CompiledIndex) -> None:
        if item.nbytes > self.max_bytes:
            return
        with self._lock:
            if (old := self._items.pop(key, None)) is not None:
                self.nbytes -= old.item.nbytes
            held = self._items[key] = _Held(item, old.hits + 1 if old else 1, 0.0, 0)
            self.nbytes += item.nbytes
            self._queue(key, held)
            while self.nbytes > self.max_bytes:
                priority, serial, victim = heapq.heappop(self._heap)
                if (gone := self._items.get(victim)) is None or gone.serial != serial:
                    continue
                self._age = priority
                del self._items[victim]
                self.nbytes -= gone.item.nbytes

    def _queue(self, key: str, held: _Held) -> None:
        held.priority = self._age + held.hits * 2**20 / max(held.item.nbytes, 1)
        held.serial = next(self._serials)
        heapq.heappush(self._heap, (held.priority, held.serial, key))
        if len(self._heap) > 2 * len(self._items) + 64:  # drop the stale records
            self._heap = [(h.priority, h.serial, k) for k, h in self._items.items()]
            heapq.heapify(self._heap)

    def pop(self, key: str) -> None:
        with self._lock:
            if (held := self._items.pop(key, None)) is not None:
                self.nbytes -= held.item.nbytes

    def __len__(self) -> int:
        return len(self._items)


class DiskStore:
    def __init__(self, directory: Path, max_bytes: int = 0):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes  # 0: unbounded
        self._evicting = threading.Lock()
        # What this directory holds, as this process last saw it (a gauge; servers that
        # share the directory each count their own writes).
        self.nbytes = sum(size for _, size, _ in self._entries())

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.idx"

    def read(self, key: str) -> mmap.mmap | bytes | None:
        """A read-only map of the entry: pages load as a request's states need them."""
        try:
            with open(self._path(key), "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    return b""
                data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                with contextlib.suppress(OSError):
                    os.utime(f.fileno())  # recently used: evicted last
                return data
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        self.nbytes -= _size(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self.nbytes += len(data)
        if self.max_bytes:
            self.evict(keep=path)

    def evict(self, keep: Path | None = None) -> int:
        """Delete least recently used entries until the directory fits `max_bytes` (and
        temporary files a crashed writer left an hour ago); returns the bytes freed."""
        freed = 0
        with self._evicting:
            entries = self._entries()
            total = sum(size for _, size, _ in entries)
            for _, size, path in sorted(entries):
                if total - freed <= self.max_bytes:
                    break
                if keep is not None and path == str(keep):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    freed += size
            self.nbytes = total - freed
        if freed:
            logger.info("index disk cache: evicted %.0f MiB", freed / 2**20)
        return freed

    def _entries(self) -> list[tuple[float, int, str]]:
        """(mtime, size, path) of every entry; temporary files a crashed writer left an
        hour ago are deleted."""
        entries = []
        for sub in os.scandir(self.directory):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                with contextlib.suppress(FileNotFoundError):
                    st = entry.stat()
                    if entry.name.startswith(".tmp-"):
                        if st.st_mtime < time.time() - 3600:
                            os.unlink(entry.path)
                        continue
                    entries.append((st.st_mtime, st.st_size, entry.path))
        return entries

    def delete(self, key: str) -> None:
        path = self._path(key)
        size = _size(path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            self.nbytes -= size


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class RemoteStore:
    """An fsspec URL; written under a unique temporary name, then moved into place."""

    def __init__(self, url: str, storage_options: dict | None = None):
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        with contextlib.suppress(Exception):
            self.fs.makedirs(self.root, exist_ok=True)

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}.idx"

    def read(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(key))
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        tmp = f"{self.root}/.tmp-{uuid.uuid4().hex}"
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, self._path(key))

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(key))


# Bytes of entries waiting for their write behind: past it (a slow disk falling behind)
# a put writes in the caller, as before; one entry alone is always written behind.
WRITE_BEHIND_BYTES = 1 << 30


class IndexCache:
    """Memory -> disk -> remote. `get` returns (CompiledIndex or None, level it came from)."""

    def __init__(self, memory_bytes: int = 1 << 30, disk_dir: Path | None = None,
                 remote_url: str | None = None,
                 on_event: Callable[[str, str], None] | None = None, disk_bytes: int = 0,
                 write_behind_bytes: int = WRITE_BEHIND_BYTES):
        self.memory = MemoryCache(memory_bytes)
        self.disk = DiskStore(disk_dir, disk_bytes) if disk_dir is not None else None
        self.remote = RemoteStore(remote_url) if remote_url else None
        self.observers: list[Callable[[str, str], None]] = [on_event] if on_event else []
        self.write_behind_bytes = write_behind_bytes
        # key -> (entry, its bytes) until the writer has stored it in every lower level
        self._pending: dict[str, tuple[CompiledIndex, bytes]] = {}
        self._pending_bytes = 0
        self._unfinished = 0  # writes behind queued and not yet reported
        self._writes: queue.SimpleQueue = queue.SimpleQueue()
        self._written = threading.Condition()
        self._writer: threading.Thread | None = None

    def _event(self, event: str, level: str) -> None:
        for observer in self.observers:
            observer(event, level)

    def get_from_memory(self, key: str) -> CompiledIndex | None:
        """The memory level alone (with entries still being written below it): no I/O,
        safe to call under a caller's lock."""
        if (item := self.memory.get(key)) is None:
            with self._written:
                pending = self._pending.get(key)
            if pending is None:
                return None
            item = pending[0]
            self.memory.put(key, item)
        self._event("hit", "memory")
        return item

    def get(self, key: str) -> tuple[CompiledIndex | None, str | None]:
        if (item := self.get_from_memory(key)) is not None:
            return item, "memory"
        for level, store in (("disk", self.disk), ("remote", self.remote)):
            if store is None:
                continue
            data = self._read(store, level, key)
            if data is None:
                continue
            try:
                item = CompiledIndex.from_buffer(data)
            except (CorruptEntry, ValueError) as e:
                logger.warning("dropping corrupt %s cache entry %s: %s", level, key, e)
                self._event("corrupt", level)
                self._delete(store, level, key)
                continue
            item.on_corrupt = lambda reason, level=level: self._drop_corrupt(key, level, reason)
            self._event("hit", level)
            self.memory.put(key, item)
            if level == "remote" and self.disk is not None:
                self._store_below(key, item, data, disk_only=True)
            return item, level
        self._event("miss", "all")
        return None, None

    def _drop_corrupt(self, key: str, level: str, reason: str) -> None:
        """A block of an entry in use failed its check: no level may serve it again."""
        logger.warning("dropping corrupt %s cache entry %s: %s", level, key, reason)
        self._event("corrupt", level)
        self.memory.pop(key)
        for name, store in (("disk", self.disk), ("remote", self.remote)):
            if store is not None:
                self._delete(store, name, key)

    def put(self, key: str, item: CompiledIndex, data: bytes | None = None) -> None:
        self.memory.put(key, item)
        if self.disk is not None or self.remote is not None:
            self._store_below(key, item, data if data is not None else item.to_bytes())

    def _store_below(self, key: str, item: CompiledIndex, data: bytes,
                     disk_only: bool = False) -> None:
        with self._written:
            behind = (self._pending_bytes == 0
                      or self._pending_bytes + len(data) <= self.write_behind_bytes)
            if behind:
                if (old := self._pending.pop(key, None)) is not None:
                    self._pending_bytes -= len(old[1])
                self._pending[key] = (item, data)
                self._pending_bytes += len(data)
                self._unfinished += 1
                if self._writer is None:
                    self._writer = threading.Thread(target=self._write_behind, daemon=True,
                                                    name="dotllm-index-cache-writer")
                    self._writer.start()
        if behind:
            self._writes.put((key, data, disk_only))
        else:
            self._stored(self._store(key, data, disk_only))

    def _store(self, key: str, data: bytes, disk_only: bool) -> list[str]:
        """Writes `data` below memory; returns the levels written (a failure is logged)."""
        levels = []
        for level, store in (("disk", self.disk), ("remote", self.remote)):
            if store is not None and not (disk_only and level == "remote"):
                self._write(store, level, key, data)
                levels.append(level)
        return levels

    def _stored(self, levels: list[str]) -> None:
        for level in levels:
            self._event("stored", level)

    def _write_behind(self) -> None:
        while True:
            key, data, disk_only = self._writes.get()
            levels = self._store(key, data, disk_only)
            with self._written:
                if (pending := self._pending.get(key)) is not None and pending[1] is data:
                    del self._pending[key]
                    self._pending_bytes -= len(data)
            try:
                self._stored(levels)
            except Exception:  # an observer's: the writer must go on
                logger.exception("index cache observer failed after writing %s", key)
            with self._written:
                self._unfinished -= 1
                self._written.notify_all()

    @property
    def pending_write_bytes(self) -> int:
        """Bytes put in memory and not yet written below it."""
        return self._pending_bytes

    def flush(self, timeout_s: float | None = None) -> bool:
        """Waits until every entry put so far is written below memory (and observers
        told); False on timeout."""
        with self._written:
            return self._written.wait_for(lambda: not self._unfinished, timeout_s)

    # A store that fails (full disk, unreachable bucket) costs a compile, not the request.
    @staticmethod
    def _read(store, level: str, key: str) -> bytes | None:
        try:
            return store.read(key)
        except Exception as e:
            logger.warning("%s cache read failed for %s: %s", level, key, e)
            return None

    @staticmethod
    def _write(store, level: str, key: str, data: bytes) -> None:
        try:
            store.write(key, data)
        except Exception as e:
            logger.warning("%s cache write failed for %s: %s", level, key, e)

    @staticmethod
    def _delete(store, level: str, key: str) -> None:
        try:
            store.delete(key)
        except Exception as e:
            logger.warning("%s cache delete failed for %s: %s", level, key, e)
