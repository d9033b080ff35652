"""A compiled constraint: the outlines-core index and its mask table, with their bytes.

The same bytes travel from a pool worker, sit in the disk and remote caches, and are
checked on load: a truncated or corrupt entry fails `from_bytes`, never serves.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import outlines_core
from blake3 import blake3

from dotllm.compiler.mask_table import MaskTable

_MAGIC = b"DOTLLMIX"
FORMAT_VERSION = 2
# magic, version, meta, index, table sizes, blake3 of the body (4x sha256's speed here:
# 14 ms instead of 61 ms for a 72 MiB entry).
_HEADER = struct.Struct("<8sIQQQ32s")


class CorruptEntry(ValueError):
    """Bytes that are not a complete compiled index of this format."""


@dataclass(frozen=True)
class CompiledIndex:
    index: outlines_core.Index
    table: MaskTable
    # Serialized size of the index, known when loaded from bytes (else measured on demand):
    # roughly what the index costs in memory.
    index_nbytes: int | None = None

    @classmethod
    def build(cls, regex: str, vocabulary, vocab_size: int, eos_token_id: int) -> CompiledIndex:
        index = outlines_core.Index(regex, vocabulary)
        return cls(index, MaskTable.build(index, vocab_size, eos_token_id))

    @cached_property
    def nbytes(self) -> int:
        index_nbytes = self.index_nbytes
        if index_nbytes is None:
            index_nbytes = len(_index_to_bytes(self.index))
        return index_nbytes + self.table.nbytes

    @property
    def num_states(self) -> int:
        return len(self.table.state_rows)

    def to_bytes(self) -> bytes:
        states = sorted(self.table.state_rows.items())
        meta = json.dumps({
            "rows": list(self.table.rows.shape),
            "states": [s for s, _ in states],
            "state_rows": [r for _, r in states],
        }).encode()
        table = self.table.rows.tobytes()
        index_bytes = _index_to_bytes(self.index)
        body = meta + index_bytes + table
        header = _HEADER.pack(_MAGIC, FORMAT_VERSION, len(meta), len(index_bytes),
                              len(table), blake3(body).digest())
        return header + body

    @classmethod
    def from_bytes(cls, data: bytes) -> CompiledIndex:
        if len(data) < _HEADER.size:
            raise CorruptEntry("shorter than its header")
        magic, version, n_meta, n_index, n_table, digest = _HEADER.unpack_from(data)
        if magic != _MAGIC or version != FORMAT_VERSION:
            raise CorruptEntry("not a DotLLM index of this format")
        body = memoryview(data)[_HEADER.size:]
        if len(body) != n_meta + n_index + n_table:
            raise CorruptEntry("truncated or padded")
        if blake3(body).digest() != digest:
            raise CorruptEntry("checksum mismatch")
        meta = json.loads(bytes(body[:n_meta]))
        index = outlines_core.Index.from_binary(bytes(body[n_meta:n_meta + n_index]))
        rows = np.frombuffer(body[n_meta + n_index:], dtype=np.int32).reshape(meta["rows"])
        table = MaskTable(rows.copy(), dict(zip(meta["states"], meta["state_rows"], strict=True)))
        return cls(index, table, n_index)


def _index_to_bytes(index: outlines_core.Index) -> bytes:
    # Index pickles as (Index.from_binary, (bincode bytes,)).
    constructor, (data,) = index.__reduce__()
    return bytes(data)
