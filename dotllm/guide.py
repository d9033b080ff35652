"""Per-request progress through a compiled index: accept, validate, roll back, fill a row.

Tokens move the request from state to state of the compiled index; EOS is accepted only
in a final state and ends the request. Masks come from the index's per-state table, so
filling a row is one copy.
"""

from __future__ import annotations

import numpy as np

from dotllm.compiler.compiled import CompiledIndex
from dotllm.compiler.mask_table import MaskTable


class Guide:
    def __init__(self, compiled: CompiledIndex, eos_token_id: int):
        self._compiled = compiled
        self._eos = eos_token_id
        self._initial = compiled.initial_state
        self._states = [self._initial]  # one entry per accepted token, for rollback
        self._terminated = False

    error: str | None = None  # an index never gives up mid-request (LLGuidanceGuide can)
    tier = "index"  # the engine serving it, for metrics

    @property
    def state(self) -> int:
        return self._states[-1]

    @property
    def num_accepted(self) -> int:
        return len(self._states) - 1

    def is_terminated(self) -> bool:
        """True once EOS has been accepted."""
        return self._terminated

    def _next(self, state: int, token: int) -> int | None:
        if token == self._eos:
            return state if self._compiled.is_final(state) else None
        return self._compiled.next_state(state, token)

    def _walk(self, tokens: list[int]) -> tuple[list[int], bool]:
        """States after each token of the longest acceptable prefix, and whether it ends in EOS."""
        if self._terminated:
            return [], True
        try:
            end = tokens.index(self._eos)
        except ValueError:
            end = len(tokens)
        states = self._compiled.walk(self.state, tokens[:end] if end < len(tokens) else tokens)
        if len(states) < end or end == len(tokens):
            return states, False
        last = states[-1] if states else self.state
        if not self._compiled.is_final(last):
            return states, False
        states.append(last)  # EOS stays where it is accepted, and ends the walk
        return states, True

    def accept_tokens(self, tokens: list[int]) -> bool:
        """Advance through all of `tokens`, or through none of them and return False."""
        if len(tokens) == 1 and not self._terminated:  # a decode step: the common case
            if (state := self._next(self._states[-1], tokens[0])) is None:
                return False
            self._states.append(state)
            self._terminated = tokens[0] == self._eos
            return True
        states, terminated = self._walk(tokens)
        if len(states) != len(tokens):
            return False
        self._states.extend(states)
        self._terminated = terminated
        return True

    def validate_tokens(self, tokens: list[int]) -> list[int]:
        """The longest prefix of `tokens` that would be accepted; the state does not move."""
        states, _ = self._walk(tokens)
        return list(tokens[: len(states)])

    def forced_tokens(self, limit: int) -> list[int]:
        """Up to `limit` tokens of what the constraint decides from here (speculative
        drafts: the model verifies them)."""
        if self._terminated:
            return []
        return self._compiled.forced_tokens(self.state)[:limit].tolist()

    def forced_alone(self, tokens: list[int]) -> int:
        """How many of `tokens`, from here, are each their state's only choice (a model
        writes them whatever its logits: canonical forced runs)."""
        state, count = self.state, 0
        for token in tokens:
            if self._terminated or not self._compiled.allows_alone(state):
                break
            if (state := self._compiled.next_state(state, token)) is None:
                break
            count += 1
        return count

    def rollback(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        num_tokens = min(num_tokens, self.num_accepted)
        del self._states[len(self._states) - num_tokens:]
        self._terminated = False

    def reset(self) -> None:
        self._states = [self._initial]
        self._terminated = False

    def table_row(self) -> tuple[MaskTable, int] | None:
        """The per-state table and its row holding this state's mask (what `fill_row`
        copies; checked when the state was reached); None once terminated."""
        if self._terminated:
            return None
        table = self._compiled.table
        return table, int(table.state_rows[self._states[-1]])

    def index_position(self) -> tuple[CompiledIndex, int] | None:
        """The index and the state this guide is at (where a device state starts); None
        once terminated."""
        if self._terminated:
            return None
        return self._compiled, self._states[-1]

    def matcher_for_mask(self) -> None:
        """No llguidance matcher: the mask is a table row."""
        return None

    def fill_row(self, out: np.ndarray) -> None:
        """Write this state's mask into `out` (int32 `[ceil(V/32)]`); -1 once terminated."""
        if self._terminated:
            out.fill(-1)
            return
        row = self._compiled.mask_row(self._states[-1])
        if len(row) == len(out):
            out[:] = row
            return
        n = min(len(row), len(out))  # a bitmask wider or narrower than the vocabulary
        out[:n] = row[:n]
        out[n:] = 0
