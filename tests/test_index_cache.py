"""IndexCache: memory -> disk -> remote (fsspec), atomic writes behind the caller,
corruption handling."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from dotllm.compiler.cache import DiskStore, IndexCache, MemoryCache, cache_key
from dotllm.compiler.compiled import CompiledIndex, CorruptEntry
from dotllm.compiler.pool import in_memory_file, mapped_file


@pytest.fixture(scope="module")
def items(vocabulary):
    def build(regex):
        return CompiledIndex.build(regex, vocabulary)
    return {"a": build("[0-9]{1,3}"), "b": build("yes|no"), "c": build("[a-c]{2}"),
            "large": build("[a-z]{1,8}")}  # 14x "a"


def put_through(cache: IndexCache, key: str, item: CompiledIndex) -> IndexCache:
    """`put`, then wait for its writes below memory (what another server reads)."""
    cache.put(key, item)
    assert cache.flush(10)
    return cache


def test_key_depends_on_vocabulary_and_spec():
    assert cache_key("v1", "s1") != cache_key("v2", "s1")
    assert cache_key("v1", "s1") != cache_key("v1", "s2")
    assert cache_key("v1", "s1") == cache_key("v1", "s1")


def test_memory_is_bounded_in_bytes_least_recently_used_first_among_equals(items):
    item = items["b"]  # one size: recency decides
    memory = MemoryCache(max_bytes=2 * item.nbytes)
    memory.put("x", item)
    memory.put("y", item)
    assert memory.get("x") is item  # now the more recent, and used twice
    memory.put("z", item)
    assert memory.get("y") is None and memory.get("x") is item and memory.get("z") is item
    assert memory.nbytes == 2 * item.nbytes <= memory.max_bytes
    MemoryCache(max_bytes=10).put("a", item)  # larger than the whole cache: skipped


def test_memory_keeps_the_small_ones_of_a_set_in_use_larger_than_it(items):
    """Requests cycling through more indexes than fit (the warm batch of 128 schemas):
    an LRU misses every one; this keeps all the small ones and lets the large one go."""
    small, large = items["a"], items["large"]
    memory = MemoryCache(max_bytes=8 * small.nbytes + large.nbytes - 1)
    keys = {f"s{i}": small for i in range(8)} | {"large": large}
    hits = []
    for _ in range(3):
        for key, item in keys.items():
            if memory.get(key) is None:
                memory.put(key, item)
            else:
                hits.append(key)
    assert sorted(hits) == sorted(f"s{i}" for i in range(8) for _ in range(2))
    assert memory.nbytes <= memory.max_bytes


def test_an_index_used_often_stays_though_large(items):
    small, large = items["a"], items["large"]
    memory = MemoryCache(max_bytes=large.nbytes + small.nbytes)
    memory.put("large", large)
    for _ in range(large.nbytes // small.nbytes + 1):  # its hits a MiB outweigh a small's
        assert memory.get("large") is large
    memory.put("s0", small)
    memory.put("s1", small)  # one of the three must go: a small one
    assert memory.get("large") is large
    assert (memory.get("s0") is None) != (memory.get("s1") is None)


def test_disk_survives_a_restart(tmp_path, items):
    events = []
    put_through(IndexCache(disk_dir=tmp_path), "k", items["a"])
    restarted = IndexCache(disk_dir=tmp_path, on_event=lambda e, lvl: events.append((e, lvl)))
    item, level = restarted.get("k")
    assert level == "disk"
    assert np.array_equal(item.table.rows, items["a"].table.rows)
    assert restarted.get("k")[1] == "memory"
    assert events == [("hit", "disk"), ("hit", "memory")]
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_remote_fills_disk_and_memory(tmp_path, items, scheme):
    url = f"file://{tmp_path}/shared" if scheme == "file" else f"memory://dotllm-{tmp_path.name}"
    put_through(IndexCache(disk_dir=tmp_path / "replica1", remote_url=url), "k", items["b"])
    replica2 = IndexCache(disk_dir=tmp_path / "replica2", remote_url=url)
    assert replica2.get("k")[1] == "remote"
    assert replica2.flush(10)
    fresh = IndexCache(disk_dir=tmp_path / "replica2")  # no remote: disk was filled
    assert fresh.get("k")[1] == "disk"


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_an_entry_mapped_from_a_compile_worker_is_written_to_every_level(tmp_path, items,
                                                                        scheme):
    data = items["c"].to_bytes()
    mapped = mapped_file(in_memory_file(data), len(data))  # as the compile pool hands it over
    url = f"file://{tmp_path}/shared" if scheme == "file" else f"memory://dotllm-m-{tmp_path.name}"
    cache = IndexCache(disk_dir=tmp_path / "d", remote_url=url)
    cache.put("k", CompiledIndex.from_buffer(mapped), mapped)
    assert cache.flush(10)
    for level in (IndexCache(disk_dir=tmp_path / "d"), IndexCache(remote_url=url)):
        item, _ = level.get("k")
        assert np.array_equal(item.table.rows, items["c"].table.rows)


def test_corrupt_disk_entry_is_dropped_not_served(tmp_path, items):
    put_through(IndexCache(disk_dir=tmp_path), "k", items["a"])
    [path] = list(tmp_path.rglob("*.idx"))
    path.write_bytes(path.read_bytes()[:-100])  # truncated
    events = []
    restarted = IndexCache(disk_dir=tmp_path, on_event=lambda e, lvl: events.append((e, lvl)))
    assert restarted.get("k") == (None, None)
    assert events == [("corrupt", "disk"), ("miss", "all")]
    assert not path.exists()


def test_corrupt_remote_entry_falls_through(tmp_path, items):
    remote = f"file://{tmp_path}/shared"
    put_through(IndexCache(disk_dir=None, remote_url=remote), "k", items["a"])
    [path] = list((tmp_path / "shared").glob("*.idx"))
    path.write_bytes(b"garbage")
    assert IndexCache(disk_dir=tmp_path / "d", remote_url=remote).get("k") == (None, None)
    assert not path.exists()


def test_unreachable_remote_costs_a_miss_not_an_error(tmp_path, items):
    cache = IndexCache(disk_dir=tmp_path / "d", remote_url=f"file://{tmp_path}/shared")
    (tmp_path / "shared").rmdir()
    (tmp_path / "shared").write_text("not a directory")
    put_through(cache, "k", items["a"])  # remote write fails, logged
    assert IndexCache(disk_dir=tmp_path / "d").get("k")[1] == "disk"


def test_a_block_found_corrupt_in_use_is_dropped_from_every_level(tmp_path, items, tokenizer):
    remote = f"file://{tmp_path}/shared"
    put_through(IndexCache(disk_dir=tmp_path / "d", remote_url=remote), "k", items["a"])
    # Damage the mask row of the state after one digit: not needed to load the entry.
    compiled = items["a"]
    digit = tokenizer.encode("7", add_special_tokens=False)[0]
    row = int(compiled.table.state_rows[compiled.next_state(compiled.initial_state, digit)])
    [path] = list((tmp_path / "d").rglob("*.idx"))
    data = bytearray(path.read_bytes())
    data[len(data) - compiled.table.rows[row:].nbytes + 3] ^= 0xFF
    path.write_bytes(bytes(data))

    events = []
    cache = IndexCache(disk_dir=tmp_path / "d", remote_url=remote,
                       on_event=lambda e, lvl: events.append((e, lvl)))
    item, level = cache.get("k")
    assert level == "disk"
    with pytest.raises(CorruptEntry, match="mask row"):
        item.next_state(item.initial_state, digit)
    assert events == [("hit", "disk"), ("corrupt", "disk")]
    assert cache.get("k") == (None, None)  # not in memory, on disk or remote any more
    assert not path.exists() and not list((tmp_path / "shared").glob("*.idx"))


def test_disk_is_bounded_least_recently_used_first(tmp_path, items):
    import os
    import time

    sizes = {k: len(item.to_bytes()) for k, item in items.items()}
    budget = sizes["a"] + sizes["b"] + sizes["c"] - 1  # one of the three must go
    writer = IndexCache(disk_dir=tmp_path, disk_bytes=budget)
    put_through(writer, "a", items["a"])
    put_through(writer, "b", items["b"])
    old = time.time() - 100
    for key in ("a", "b"):
        path = writer.disk._path(key)
        os.utime(path, (old, old))
    reader = IndexCache(disk_dir=tmp_path)  # another server sharing the directory
    held, _ = reader.get("a")  # "a" is used (and stays mapped there): "b" is now oldest
    put_through(writer, "c", items["c"])
    present = {k for k in "abc" if writer.disk._path(k).exists()}
    assert present == {"a", "c"}
    total = sum(p.stat().st_size for p in tmp_path.rglob("*.idx"))
    assert total <= budget
    assert held.num_states == items["a"].num_states  # the mapped entry still reads


def test_an_entry_evicted_by_another_server_is_a_miss_here(tmp_path, items):
    one = put_through(IndexCache(disk_dir=tmp_path), "k", items["a"])
    one.disk.delete("k")  # as another server's eviction would
    assert IndexCache(disk_dir=tmp_path).get("k") == (None, None)


def test_the_disk_level_knows_its_size_through_writes_deletes_and_eviction(tmp_path):
    store = DiskStore(tmp_path)
    store.write("aa1", b"x" * 100)
    store.write("ab2", b"y" * 50)
    store.write("aa1", b"z" * 30)  # replaced, not added
    assert store.nbytes == 80
    assert DiskStore(tmp_path).nbytes == 80  # a restarted server counts what is there
    store.delete("ab2")
    store.delete("ab2")
    assert store.nbytes == 30
    bounded = DiskStore(tmp_path, max_bytes=40)
    bounded.write("ac3", b"w" * 25)  # 55 > 40: the older entry goes
    assert bounded.nbytes == 25


WRITER = "dotllm-index-cache-writer"


class SlowDisk(DiskStore):
    """A disk whose writes behind wait to be let through; records each write's thread."""

    def __init__(self, directory):
        super().__init__(directory)
        self.let_through = threading.Event()
        self.writing_behind = threading.Event()
        self.writers: list[str] = []

    def write(self, key: str, data: bytes) -> None:
        self.writers.append(threading.current_thread().name)
        if threading.current_thread().name == WRITER:
            self.writing_behind.set()
            assert self.let_through.wait(10)
        super().write(key, data)


def test_a_put_returns_before_its_disk_write_and_the_entry_reads_meanwhile(tmp_path, items):
    events = []
    one_fits = max(items["a"].nbytes, items["b"].nbytes)
    cache = IndexCache(memory_bytes=one_fits, disk_dir=tmp_path,
                       on_event=lambda e, lvl: events.append((e, lvl)))
    cache.disk = SlowDisk(tmp_path)
    cache.put("b", items["b"])  # would wait for let_through if written here
    assert not cache.flush(0.05) and not list(tmp_path.rglob("*.idx"))
    cache.put("a", items["a"])  # memory holds one of them: the larger "b" goes there
    assert cache.memory.get("b") is None
    assert cache.get_from_memory("b") is items["b"]  # not written yet, still served
    cache.disk.let_through.set()
    assert cache.flush(10)
    assert events.count(("stored", "disk")) == 2
    assert IndexCache(disk_dir=tmp_path).get("b")[1] == "disk"
    assert cache.disk.writers == [WRITER] * 2


def test_writes_fall_back_to_the_caller_when_the_disk_falls_behind(tmp_path, items):
    cache = IndexCache(disk_dir=tmp_path, write_behind_bytes=1)
    cache.disk = SlowDisk(tmp_path)
    cache.put("a", items["a"])  # alone: behind, however large
    assert cache.disk.writing_behind.wait(10)
    cache.put("b", items["b"])  # "a" still waits: over the bound, written here
    assert cache.disk.writers == [WRITER, threading.current_thread().name]
    assert IndexCache(disk_dir=tmp_path).get("b")[1] == "disk"
    cache.disk.let_through.set()
    assert cache.flush(10)
    assert IndexCache(disk_dir=tmp_path).get("a")[1] == "disk"
