"""Per-state token masks, computed once when an index is built.

`Guide.write_mask_into` costs ~124 us a call at V=131,072 (up to ~430 us inside free
text), too slow for every row of every step. An index has few states (p50 ~150), and
many share one mask (every position inside a string), so the distinct masks are packed
once into one contiguous int32 array `[rows, ceil(V/32)]` (vLLM's bitmask layout: token
t is bit t & 31 of word t >> 5) with a state -> row map. A step then copies one row per
request, and the same table can later live on the GPU and be gathered by row id.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from dotllm.compiler.transitions import TransitionTable


def words_for(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def pack_tokens(token_ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """A packed int32 mask row with exactly `token_ids` allowed."""
    allowed = np.zeros(words_for(vocab_size) * 32, dtype=bool)
    allowed[token_ids] = True
    return np.packbits(allowed, bitorder="little").view(np.int32)


_serials = itertools.count()


@dataclass(frozen=True)
class MaskTable:
    rows: np.ndarray  # int32 [num_rows, words], C-contiguous
    state_rows: np.ndarray  # int32 [num_states]: state -> row in `rows`
    # Names this table (not its constraint: a recompiled entry is another table) for the
    # copies of it that model workers keep (dotllm.mask_plan).
    serial: int = field(default_factory=lambda: next(_serials), compare=False, repr=False)

    @classmethod
    def build(cls, transitions: TransitionTable, vocab_size: int,
              eos_token_id: int) -> MaskTable:
        rows: list[np.ndarray] = []
        row_of_mask: dict[bytes, int] = {}
        state_rows = np.zeros(transitions.num_states, dtype=np.int32)
        for state in range(transitions.num_states):
            ids = transitions.tokens_from(state)
            if transitions.finals[state]:
                ids = np.append(ids, eos_token_id)
            key = (row := pack_tokens(ids, vocab_size)).tobytes()
            if key not in row_of_mask:
                row_of_mask[key] = len(rows)
                rows.append(row)
            state_rows[state] = row_of_mask[key]
        table = np.ascontiguousarray(np.stack(rows)) if rows else np.zeros(
            (0, words_for(vocab_size)), dtype=np.int32)
        return cls(table, state_rows)

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.state_rows.nbytes

    def row(self, state: int) -> np.ndarray:
        return self.rows[self.state_rows[state]]
