"""Tiers, like a JIT's: a request starts on llguidance at once while outlines-core compiles
its index, then moves to the index at a step boundary.

outlines-core takes seconds to build an index (p90 ~12 s on real schemas) but then costs a
table lookup per token; llguidance needs no build but computes every mask on the CPU. So a
request whose index is not ready does not wait for it: it decodes on llguidance, and when
the index arrives, the tokens it has accepted so far are replayed through the index to
find its state there. If the index refuses them (the engines disagree), the request stays
on llguidance. Either way later requests with the same constraint start on the index.

The other way round too: an index read from a cache is checked block by block as a request
reaches each part of it. A block found corrupt mid-request is the server's fault, not the
client's, so llguidance takes over (`IndexWithFallback`) and the request goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future

import llguidance
import numpy as np

from dotllm.compiler.compiled import CompiledIndex, CorruptEntry
from dotllm.compiler.mask_table import MaskTable
from dotllm.compiler.pool import CompileFailed
from dotllm.compiler.spec import ConstraintError
from dotllm.guide import Guide
from dotllm.llguidance_guide import LLGuidanceGuide


class TieredGuide:
    """`Guide`'s interface: llguidance until `index` is ready, then the index if it agrees;
    an index ready by the first step (compiled while the prompt prefilled) serves it all.

    `on_handover` hears once how it went: "switched", "mismatch", or why the index never
    came ("timeout", "too_large", "crash", "invalid").
    """

    def __init__(self, first: LLGuidanceGuide, index: Future, eos_token_id: int,
                 on_handover: Callable[[str], None],
                 make_llguidance: Callable[[], LLGuidanceGuide],
                 release: Callable[[Future, bool], None] = lambda future, abandoned: None):
        self._current: LLGuidanceGuide | IndexWithFallback = first
        self._make_llguidance = make_llguidance
        self._release = release  # told when this request no longer wants the index
        self._index: Future | None = index
        self._eos = eos_token_id
        self._accepted: list[int] = []  # replayed through the index when it arrives
        self._on_handover = on_handover

    @property
    def tier(self) -> str:
        return self._current.tier

    def _hand_over_if_ready(self, tokens: list[int]) -> bool:
        """Move to the index if it is ready and accepts everything so far plus `tokens`
        (they were drawn from llguidance's mask: the index must allow them too)."""
        if self._index is None or not self._index.done() or self._current.is_terminated():
            return False
        future, self._index = self._index, None
        accepted, self._accepted = self._accepted, []
        self._release(future, False)
        try:
            compiled = future.result()
        except (CompileFailed, ConstraintError) as e:
            self._on_handover(getattr(e, "kind", "invalid"))
            return False
        guide = IndexWithFallback(Guide(compiled, self._eos), self._make_llguidance,
                                  self._on_handover)
        if guide.accept_tokens(accepted) and guide.accept_tokens(tokens):
            self._current = guide
            self._on_handover("switched")
            return True
        self._on_handover("mismatch")
        return False

    def accept_tokens(self, tokens: list[int]) -> bool:
        if self._hand_over_if_ready(tokens):
            return True
        if not self._current.accept_tokens(tokens):
            return False
        if self._index is not None:
            self._accepted.extend(tokens)
        return True

    def validate_tokens(self, tokens: list[int]) -> list[int]:
        return self._current.validate_tokens(tokens)

    def forced_tokens(self, limit: int) -> list[int]:
        self._hand_over_if_ready([])  # drafts are asked for at a step boundary too
        return self._current.forced_tokens(limit)

    def forced_alone(self, tokens: list[int]) -> int:
        return self._current.forced_alone(tokens)

    def rollback(self, num_tokens: int) -> None:
        self._current.rollback(num_tokens)
        if self._index is not None and num_tokens > 0:
            del self._accepted[max(0, len(self._accepted) - num_tokens):]

    def reset(self) -> None:
        self._current.reset()
        self._accepted.clear()

    def is_terminated(self) -> bool:
        return self._current.is_terminated()

    def close(self) -> None:
        """The request is over: if its index never came, it does not want it any more
        (abandoned unless it ended by itself)."""
        if self._index is not None:
            future, self._index = self._index, None
            self._release(future, not self.is_terminated())

    @property
    def error(self) -> str | None:
        return self._current.error

    # A row is asked for at each step boundary: an index that arrived since the last step
    # (during the prompt's prefill, for the first) serves this step's row already.

    def table_row(self) -> tuple[MaskTable, int] | None:
        self._hand_over_if_ready([])
        return self._current.table_row()

    def fill_row(self, out: np.ndarray) -> None:
        self._hand_over_if_ready([])
        self._current.fill_row(out)

    def index_position(self) -> tuple[CompiledIndex, int] | None:
        self._hand_over_if_ready([])
        return self._current.index_position()

    def matcher_for_mask(self) -> llguidance.LLMatcher | None:
        self._hand_over_if_ready([])
        return self._current.matcher_for_mask()


class ServerFault(Exception):
    """The request cannot go on for a fault of the server's (not the constraint's)."""


class IndexWithFallback:
    """`Guide`'s interface over an index; where a block of it turns out corrupt, a fresh
    llguidance guide replays the tokens accepted so far and serves the rest of the
    request. `on_fallback("corrupt")` hears of it; ServerFault if llguidance cannot
    serve the constraint either."""

    def __init__(self, index: Guide, make_llguidance: Callable[[], LLGuidanceGuide],
                 on_fallback: Callable[[str], None]):
        self._current: Guide | LLGuidanceGuide = index
        self._make_llguidance = make_llguidance
        self._on_fallback = on_fallback
        self._tokens: list[int] = []  # accepted on the index, for the replay

    @property
    def tier(self) -> str:
        return self._current.tier

    @property
    def error(self) -> str | None:
        return self._current.error

    def _fall_back(self, corrupt: CorruptEntry) -> None:
        try:
            guide = self._make_llguidance()
        except ConstraintError as e:
            raise ServerFault(f"the cached compiled constraint is corrupt ({corrupt}) and "
                              f"llguidance cannot serve it ({e}); it was dropped: retry "
                              "the request") from None
        if not guide.accept_tokens(self._tokens):
            raise ServerFault(f"the cached compiled constraint is corrupt ({corrupt}) and "
                              "llguidance does not allow what it wrote so far; it was "
                              "dropped: retry the request")
        self._current, self._tokens = guide, []
        self._on_fallback("corrupt")

    def _on_index(self) -> bool:
        return isinstance(self._current, Guide)

    def accept_tokens(self, tokens: list[int]) -> bool:
        if self._on_index():
            try:
                if not self._current.accept_tokens(tokens):
                    return False
                self._tokens.extend(tokens)
                return True
            except CorruptEntry as e:
                self._fall_back(e)
        return self._current.accept_tokens(tokens)

    def _guarded(self, method: str, *args):
        """`method` of the guide in use; a corrupt block of the index met on the way
        falls back to llguidance, which then answers."""
        if self._on_index():
            try:
                return getattr(self._current, method)(*args)
            except CorruptEntry as e:
                self._fall_back(e)
        return getattr(self._current, method)(*args)

    def validate_tokens(self, tokens: list[int]) -> list[int]:
        return self._guarded("validate_tokens", tokens)

    def table_row(self) -> tuple[MaskTable, int] | None:
        return self._current.table_row()

    def index_position(self) -> tuple[CompiledIndex, int] | None:
        return self._current.index_position()

    def forced_tokens(self, limit: int) -> list[int]:
        return self._current.forced_tokens(limit)  # (an eager part: checked on load)

    def forced_alone(self, tokens: list[int]) -> int:
        return self._guarded("forced_alone", tokens)

    def fill_row(self, out: np.ndarray) -> None:
        self._guarded("fill_row", out)

    def matcher_for_mask(self) -> llguidance.LLMatcher | None:
        return self._current.matcher_for_mask()  # None on the index: `fill_row` checks it

    def rollback(self, num_tokens: int) -> None:
        self._current.rollback(num_tokens)
        if self._on_index() and num_tokens > 0:
            del self._tokens[max(0, len(self._tokens) - num_tokens):]

    def reset(self) -> None:
        self._current.reset()
        self._tokens.clear()

    def is_terminated(self) -> bool:
        return self._current.is_terminated()
