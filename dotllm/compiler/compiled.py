"""A compiled constraint: its transition table and mask table, and their bytes.

The same bytes travel from a pool worker, sit in the disk and remote caches, and are used
in place (a memory map from disk, no copy, no deserialization), so a warm lookup costs
the same whatever the index's size. Integrity is checked the way dm-verity does it:

- eagerly, the small part (per-state arrays and the digests of every block) against the
  header's blake3 digest, plus the blocks the initial state needs;
- lazily, each block of transitions and each mask row against its own digest, the first
  time a request reaches a state that needs it, before anything of it is used.

A truncated or corrupt entry therefore never serves: found on load, `from_buffer` raises;
found later, the state is refused, `on_corrupt` drops the entry from every cache, and the
request ends with an error rather than output the constraint may not allow.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Callable

import numpy as np
import outlines_core
from blake3 import blake3

from dotllm.compiler.canonical import narrow_forced_runs
from dotllm.compiler.forced import ForcedTable, forced_texts
from dotllm.compiler.mask_table import MaskTable
from dotllm.compiler.spec import ConstraintSpec
from dotllm.compiler.transitions import TransitionTable
from dotllm.compiler.vocabulary import Vocabulary

_MAGIC = b"DOTLLMIX"
FORMAT_VERSION = 6  # 4: indexes anchored at the end (outlines_index); 5: forced drafts;
# 6: canonical forced runs
_HEADER = struct.Struct("<8sIQ32s")  # magic, version, meta size, blake3 of the eager part
_ALIGN = 64
_DIGEST = 16  # bytes of blake3 kept per block
_CHUNK = 1 << 16  # transitions per lazily checked block (512 KiB of tokens + targets)
# finals, offsets, state rows, forced offsets and tokens, block digests, row digests; then
# the blocks
_EAGER_PARTS = 7


_NUMBER_START = (b"-", *(bytes([d]) for d in b"0123456789"))


def outlines_index(regex: str, vocabulary: outlines_core.Vocabulary, *,
                   json_text: bool = False) -> outlines_core.Index:
    """outlines-core's index of `regex`, matched as a whole.

    outlines-core 0.2.14 builds on a leftmost-first DFA that reports a match one byte late,
    and keeps a token only if the state it ends in is not a match state or is a complete
    match. Where the text so far already matches, that drops every token that goes on from
    there and is not itself complete one byte later: after `true` in
    `(true|false)(, (true|false))*` the comma, after `12` in `[0-9]+(\\.[0-9]+)?` the dot;
    and the DFA drops alternatives once an earlier one has matched, so the choice
    `["a", "ab"]` only ever writes "a". Anchored at the end of the text (`\\z`), the DFA
    matches only there, and every token that keeps the text a live prefix stays.

    A JSON text (`json_text`) that is not a number ends by itself: nothing goes on from a
    complete object, array, string or literal, so its index is exact unanchored, and is
    left so. The anchor has a cost: the DFA also serves unanchored searches, and an end
    anchor keeps every start of one alive (`[a-z](?:[a-z-]{0,n}[a-z])?` doubles its
    build time with each n past 10).
    """
    if json_text:
        index = outlines_core.Index(regex, vocabulary)
        allowed = set(index.get_allowed_tokens(index.get_initial_state()))
        starts = [vocabulary.get(b) for b in _NUMBER_START]
        if all(ids is not None and not allowed.intersection(ids) for ids in starts):
            return index
    return outlines_core.Index(f"(?:{regex})\\z", vocabulary)


class CorruptEntry(ValueError):
    """Bytes that are not a complete, intact compiled index of this format."""


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _digest(*parts) -> bytes:
    h = blake3()
    for part in parts:
        h.update(memoryview(part).cast("B"))
    return h.digest(length=_DIGEST)


class CompiledIndex:
    def __init__(self, transitions: TransitionTable, table: MaskTable, forced: ForcedTable,
                 blocks: _BlockCheck | None = None):
        self.transitions = transitions
        self.table = table
        self.forced = forced
        self._blocks = blocks  # None: built here, nothing to check
        # Set by the cache that served the entry: drops it everywhere when a block is bad.
        self.on_corrupt: Callable[[str], None] | None = None

    @classmethod
    def build(cls, regex: str, vocabulary: Vocabulary, *, json_text: bool = False
              ) -> CompiledIndex:
        return cls.from_index(outlines_index(regex, vocabulary.inner, json_text=json_text),
                              vocabulary)

    @classmethod
    def for_spec(cls, spec: ConstraintSpec, vocabulary: Vocabulary) -> CompiledIndex:
        """What a compile worker builds for `spec`."""
        return cls.build(spec.to_regex(), vocabulary, json_text=spec.is_json)

    @classmethod
    def from_index(cls, index: outlines_core.Index, vocabulary: Vocabulary) -> CompiledIndex:
        transitions = TransitionTable.from_index(index)
        texts = forced_texts(transitions, vocabulary.token_bytes)
        if (encoder := vocabulary.encoder()) is not None:
            transitions = narrow_forced_runs(transitions, vocabulary.token_bytes, texts,
                                             encoder)
        eos = vocabulary.eos_token_id
        return cls(transitions, MaskTable.build(transitions, vocabulary.size, eos),
                   ForcedTable.build(transitions, vocabulary.token_bytes, eos, texts))

    @property
    def num_states(self) -> int:
        return self.transitions.num_states

    @property
    def nbytes(self) -> int:
        return self.transitions.nbytes + self.table.nbytes + self.forced.nbytes

    @property
    def initial_state(self) -> int:
        return self.transitions.initial_state

    def is_final(self, state: int) -> bool:
        return bool(self.transitions.finals[state])

    def next_state(self, state: int, token: int) -> int | None:
        """The state `token` leads to, checked before first use; None if not allowed."""
        nxt = self.transitions.next_state(state, token)
        if nxt is not None and self._blocks is not None and not self._blocks.state_ok[nxt]:
            self._check_state(nxt)
        return nxt

    def walk(self, state: int, tokens: list[int]) -> list[int]:
        """The states after each token of the longest prefix of `tokens` (no EOS) allowed
        from `state`, each checked before first use."""
        if self._blocks is None or self._blocks.whole:
            return self.transitions.walk(state, tokens)
        states = []
        for token in tokens:
            if (state := self.next_state(state, token)) is None:
                break
            states.append(state)
        return states

    def mask_row(self, state: int) -> np.ndarray:
        return self.table.row(state)

    def allows_alone(self, state: int) -> bool:
        """Whether `state` allows one token and nothing else (not even EOS)."""
        offsets = self.transitions.offsets
        return offsets[state + 1] - offsets[state] == 1 and not self.transitions.finals[state]

    def forced_tokens(self, state: int) -> np.ndarray:
        """Draft tokens for what the constraint decides from `state` on (often none)."""
        return self.forced.tokens_from(state)

    def check_all(self) -> None:
        """Every block checked now, for a user that reaches any state without asking
        (states advanced on the GPU); CorruptEntry as for a state."""
        if self._blocks is not None:
            self._check_state(None)

    def _check_state(self, state: int | None) -> None:
        try:
            if state is None:
                self._blocks.check_all()
            else:
                self._blocks.check_state(state)
        except CorruptEntry as e:
            if self.on_corrupt is not None:
                self.on_corrupt(str(e))
            raise

    # -- bytes ---------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        t, m, f = self.transitions, self.table, self.forced
        n_chunks = -(-len(t.tokens) // _CHUNK)
        chunk_digests = b"".join(
            _digest(t.tokens[i * _CHUNK:(i + 1) * _CHUNK], t.targets[i * _CHUNK:(i + 1) * _CHUNK])
            for i in range(n_chunks))
        row_digests = b"".join(_digest(row) for row in m.rows)
        meta = json.dumps({
            "initial": t.initial_state, "states": t.num_states, "transitions": len(t.tokens),
            "rows": m.rows.shape[0], "words": m.rows.shape[1], "chunk": _CHUNK,
            "forced": len(f.tokens),
        }).encode()
        parts = [t.finals, t.offsets, m.state_rows, f.offsets, f.tokens, chunk_digests,
                 row_digests, t.tokens, t.targets, m.rows]
        out = bytearray(_HEADER.size + len(meta))
        out[_HEADER.size:] = meta
        eager_end = 0
        for i, part in enumerate(parts):
            out += bytes(_aligned(len(out)) - len(out))
            out += memoryview(part).cast("B") if isinstance(part, np.ndarray) else part
            if i == _EAGER_PARTS - 1:
                eager_end = len(out)
        digest = blake3(memoryview(out)[_HEADER.size:eager_end]).digest()
        _HEADER.pack_into(out, 0, _MAGIC, FORMAT_VERSION, len(meta), digest)
        return bytes(out)

    @classmethod
    def from_buffer(cls, data) -> CompiledIndex:
        """Use `data` (bytes, or a memory map) in place; checks the eager part now."""
        buf = memoryview(data).cast("B")
        if len(buf) < _HEADER.size:
            raise CorruptEntry("shorter than its header")
        magic, version, n_meta, digest = _HEADER.unpack_from(buf)
        if magic != _MAGIC or version != FORMAT_VERSION:
            raise CorruptEntry("not a DotLLM index of this format")
        try:
            meta = json.loads(bytes(buf[_HEADER.size:_HEADER.size + n_meta]))
            n, t, r, w = meta["states"], meta["transitions"], meta["rows"], meta["words"]
            chunk, d = meta["chunk"], meta["forced"]
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptEntry(f"unreadable metadata: {e}") from None
        n_chunks = -(-t // chunk)
        layout = [(np.uint8, n), (np.int64, n + 1), (np.int32, n), (np.int64, n + 1),
                  (np.int32, d), (np.uint8, n_chunks * _DIGEST), (np.uint8, r * _DIGEST),
                  (np.int32, t), (np.int32, t), (np.int32, r * w)]
        arrays, pos, eager_end = [], _HEADER.size + n_meta, 0
        for i, (dtype, count) in enumerate(layout):
            pos = _aligned(pos)
            end = pos + count * np.dtype(dtype).itemsize
            if end > len(buf):
                raise CorruptEntry("truncated")
            arrays.append(np.frombuffer(buf[pos:end], dtype=dtype))
            pos = end
            if i == _EAGER_PARTS - 1:
                eager_end = end
        if pos != len(buf):
            raise CorruptEntry("truncated or padded")
        if blake3(buf[_HEADER.size:eager_end]).digest() != digest:
            raise CorruptEntry("checksum mismatch")
        (finals, offsets, state_rows, forced_offsets, forced_tokens, chunk_digests, row_digests,
         tokens, targets, rows) = arrays
        transitions = TransitionTable(meta["initial"], finals, offsets, tokens, targets)
        table = MaskTable(rows.reshape(r, w), state_rows)
        blocks = _BlockCheck(transitions, table, chunk, chunk_digests, row_digests)
        blocks.check_state(transitions.initial_state)
        return cls(transitions, table, ForcedTable(forced_offsets, forced_tokens), blocks)


class _BlockCheck:
    """Which blocks of a loaded entry have matched their digests, checked state by state."""

    def __init__(self, transitions: TransitionTable, table: MaskTable, chunk: int,
                 chunk_digests: np.ndarray, row_digests: np.ndarray):
        self._transitions, self._table, self._chunk = transitions, table, chunk
        self._chunk_digests = chunk_digests.reshape(-1, _DIGEST)
        self._row_digests = row_digests.reshape(-1, _DIGEST)
        self._chunk_ok = bytearray(len(self._chunk_digests))
        self._row_ok = bytearray(len(self._row_digests))
        self.state_ok = bytearray(transitions.num_states)
        self.whole = False  # every block checked
        self._lock = threading.Lock()

    def _check_chunk(self, c: int) -> None:
        if not self._chunk_ok[c]:
            t, a, b = self._transitions, c * self._chunk, (c + 1) * self._chunk
            if _digest(t.tokens[a:b], t.targets[a:b]) != self._chunk_digests[c].tobytes():
                raise CorruptEntry(f"transitions block {c} fails its checksum")
            self._chunk_ok[c] = 1

    def _check_row(self, row: int) -> None:
        if not self._row_ok[row]:
            if _digest(self._table.rows[row]) != self._row_digests[row].tobytes():
                raise CorruptEntry(f"mask row {row} fails its checksum")
            self._row_ok[row] = 1

    def check_state(self, state: int) -> None:
        t = self._transitions
        with self._lock:
            lo, hi = int(t.offsets[state]), int(t.offsets[state + 1])
            for c in range(lo // self._chunk, -(-hi // self._chunk)):
                self._check_chunk(c)
            self._check_row(int(self._table.state_rows[state]))
            self.state_ok[state] = 1

    def check_all(self) -> None:
        with self._lock:
            if all(self.state_ok):
                return
            for c in range(len(self._chunk_ok)):
                self._check_chunk(c)
            for row in range(len(self._row_ok)):
                self._check_row(row)
            self.state_ok[:] = b"\x01" * len(self.state_ok)
            self.whole = True
