"""Tiers, like a JIT's: a request starts on llguidance at once while outlines-core compiles
its index, then moves to the index at a step boundary.

outlines-core takes seconds to build an index (p90 ~12 s on real schemas) but then costs a
table lookup per token; llguidance needs no build but computes every mask on the CPU. So a
request whose index is not ready does not wait for it: it decodes on llguidance, and when
the index arrives, the tokens it has accepted so far are replayed through the index to
find its state there. If the index refuses them (the engines disagree), the request stays
on llguidance. Either way later requests with the same constraint start on the index.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

from dotllm.compiler.pool import CompileFailed
from dotllm.compiler.spec import ConstraintError
from dotllm.guide import Guide
from dotllm.llguidance_guide import LLGuidanceGuide


class TieredGuide:
    """`Guide`'s interface: llguidance until `index` is ready, then the index if it agrees.

    `on_handover` hears once how it went: "switched", "mismatch", or why the index never
    came ("timeout", "too_large", "crash", "invalid").
    """

    def __init__(self, first: LLGuidanceGuide, index: Future, eos_token_id: int,
                 on_handover: Callable[[str], None]):
        self._current: LLGuidanceGuide | Guide = first
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
        try:
            compiled = future.result()
        except (CompileFailed, ConstraintError) as e:
            self._on_handover(getattr(e, "kind", "invalid"))
            return False
        guide = Guide(compiled, self._eos)
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

    def rollback(self, num_tokens: int) -> None:
        self._current.rollback(num_tokens)
        if self._index is not None and num_tokens > 0:
            del self._accepted[max(0, len(self._accepted) - num_tokens):]

    def reset(self) -> None:
        self._current.reset()
        self._accepted.clear()

    def is_terminated(self) -> bool:
        return self._current.is_terminated()

    @property
    def error(self) -> str | None:
        return self._current.error

    def fill_row(self, out: np.ndarray) -> None:
        self._current.fill_row(out)
