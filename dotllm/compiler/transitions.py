"""An index's transitions as flat arrays: what a request needs to move from state to state.

outlines-core keeps transitions in nested hash maps that load only through a full
deserialization (147 ms, holding the GIL, for json_object's 8.6 M transitions). Here
states are renumbered 0..N-1 and each state's outgoing transitions are one sorted slice of
two int32 arrays (CSR), so a cached index is used straight from a memory map and a step
is a binary search.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import outlines_core


@dataclass(frozen=True)
class TransitionTable:
    initial_state: int
    finals: np.ndarray  # uint8 [N]: 1 where EOS may end the output
    offsets: np.ndarray  # int64 [N + 1]: state s owns tokens[offsets[s]:offsets[s + 1]]
    tokens: np.ndarray  # int32 [T], sorted within each state
    targets: np.ndarray  # int32 [T], the state each token leads to

    @classmethod
    def from_index(cls, index: outlines_core.Index) -> TransitionTable:
        transitions = index.get_transitions()
        finals = index.get_final_states()
        initial = index.get_initial_state()
        ids = {initial, *finals, *transitions}
        for moves in transitions.values():
            ids.update(moves.values())
        state_ids = np.array(sorted(ids), dtype=np.int64)
        counts = np.zeros(len(state_ids), dtype=np.int64)
        token_parts, target_parts = [], []
        for state, moves in sorted(transitions.items()):
            tokens = np.fromiter(moves.keys(), dtype=np.int32, count=len(moves))
            targets = np.fromiter(moves.values(), dtype=np.int64, count=len(moves))
            order = np.argsort(tokens, kind="stable")
            token_parts.append(tokens[order])
            target_parts.append(np.searchsorted(state_ids, targets[order]).astype(np.int32))
            counts[np.searchsorted(state_ids, state)] = len(moves)
        offsets = np.zeros(len(state_ids) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        is_final = np.zeros(len(state_ids), dtype=np.uint8)
        is_final[np.searchsorted(state_ids, np.fromiter(finals, dtype=np.int64))] = 1
        empty = np.zeros(0, dtype=np.int32)
        return cls(
            initial_state=int(np.searchsorted(state_ids, initial)),
            finals=is_final,
            offsets=offsets,
            tokens=np.concatenate(token_parts) if token_parts else empty,
            targets=np.concatenate(target_parts) if target_parts else empty,
        )

    @property
    def num_states(self) -> int:
        return len(self.finals)

    @property
    def nbytes(self) -> int:
        return self.finals.nbytes + self.offsets.nbytes + self.tokens.nbytes + self.targets.nbytes

    def tokens_from(self, state: int) -> np.ndarray:
        return self.tokens[self.offsets[state]:self.offsets[state + 1]]

    @cached_property
    def _views(self) -> tuple[memoryview, memoryview, memoryview]:
        # Plain ints and C bisect: ~1 us a token, no numpy call per step.
        return memoryview(self.offsets), memoryview(self.tokens), memoryview(self.targets)

    def next_state(self, state: int, token: int) -> int | None:
        offsets, tokens, targets = self._views
        hi = offsets[state + 1]
        i = bisect_left(tokens, token, offsets[state], hi)
        if i < hi and tokens[i] == token:
            return targets[i]
        return None

    def walk(self, state: int, tokens: list[int]) -> list[int]:
        """The states after each token of the longest prefix of `tokens` allowed from
        `state` (one loop, no call a token: the host catching up with the device)."""
        offsets, allowed, targets = self._views
        states = []
        for token in tokens:
            hi = offsets[state + 1]
            i = bisect_left(allowed, token, offsets[state], hi)
            if i == hi or allowed[i] != token:
                break
            state = targets[i]
            states.append(state)
        return states
