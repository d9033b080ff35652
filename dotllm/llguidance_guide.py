"""Per-request progress through an llguidance matcher, with `Guide`'s interface.

llguidance computes each mask when asked (tens of microseconds, more in wide states)
rather than copying a precomputed row: it serves what outlines-core cannot compile.
EOS is accepted only where the grammar may end, and ends the request.
"""

from __future__ import annotations

import functools
import os

import llguidance
import llguidance.numpy
import numpy as np


class LLGuidanceGuide:
    tier = "llguidance"  # the engine serving it, for metrics

    def __init__(self, matcher: llguidance.LLMatcher, eos_token_id: int):
        self._matcher = matcher
        self._eos = eos_token_id
        self._terminated = False
        # EOS accepted after the matcher had already stopped by itself (the grammar could
        # not go on): it consumed nothing, so a rollback undoes one token less.
        self._eos_lag = 0

    def is_terminated(self) -> bool:
        return self._terminated

    @property
    def error(self) -> str | None:
        """Why the matcher gave up, if it did (a grammar past llguidance's parser limits)."""
        return self._matcher.get_error() if self._matcher.is_error() else None

    def accept_tokens(self, tokens: list[int]) -> bool:
        """Advance through all of `tokens`, or through none of them and return False."""
        if self._terminated:
            return False
        if self._matcher.is_error():  # it gave up (a limit): it must not end the output
            return False
        if self._matcher.is_stopped():
            if list(tokens) == [self._eos]:
                self._terminated, self._eos_lag = True, 1
                return True
            return False
        consumed = self._matcher.try_consume_tokens(tokens)
        if consumed == len(tokens) - 1 and tokens[-1] == self._eos and self._matcher.is_stopped(
                ) and not self._matcher.is_error():
            self._terminated, self._eos_lag = True, 1  # the tokens before EOS ended it
            return True
        if consumed != len(tokens):
            if consumed:
                self._matcher.rollback(consumed)
            return False
        self._terminated = bool(tokens) and tokens[-1] == self._eos
        return True

    def validate_tokens(self, tokens: list[int]) -> list[int]:
        """The longest prefix of `tokens` that would be accepted; the state does not move."""
        if self._terminated or not tokens:
            return []
        if self._matcher.is_stopped():
            return [self._eos] if tokens[0] == self._eos else []
        return list(tokens[: self._matcher.validate_tokens(tokens)])

    def forced_tokens(self, limit: int) -> list[int]:
        """Up to `limit` tokens llguidance's grammar decides from here (its fast-forward)."""
        if self._terminated or self._matcher.is_stopped() or self._matcher.is_error():
            return []
        return self._matcher.compute_ff_tokens()[:limit]

    def forced_alone(self, tokens: list[int]) -> int:
        """Its fast-forward tokens are forced by its grammar: all of them."""
        return len(tokens)

    def rollback(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        if num_tokens - self._eos_lag > 0:
            self._matcher.rollback(num_tokens - self._eos_lag)
        self._terminated, self._eos_lag = False, 0

    def reset(self) -> None:
        self._matcher.reset()
        self._terminated, self._eos_lag = False, 0

    def table_row(self) -> None:
        """No per-state table: each mask is computed (`fill_row`)."""
        return None

    def index_position(self) -> None:
        """Not on a compiled index."""
        return None

    def fill_row(self, out: np.ndarray) -> None:
        """Write the allowed tokens into `out` (int32 `[ceil(V/32)]`); -1 once terminated."""
        if self._terminated:
            out.fill(-1)
            return
        llguidance.numpy.fill_next_token_bitmask(self._matcher, out.reshape(1, -1), 0)

    def matcher_for_mask(self) -> llguidance.LLMatcher | None:
        """The matcher that computes this step's mask, for `fill_rows_in_parallel`; None once
        terminated (`fill_row` writes that row)."""
        return None if self._terminated else self._matcher


def fill_rows_in_parallel(matchers: list[tuple[llguidance.LLMatcher, int]],
                          rows: np.ndarray) -> None:
    """rows[i] for each (matcher, i) of a step, computed by llguidance's own threads in one
    call: the GIL is dropped once, not once a row (rows: C-contiguous int32 [n, words])."""
    if len(matchers) == 1:
        llguidance.numpy.fill_next_token_bitmask(matchers[0][0], rows, matchers[0][1])
    elif matchers:
        llguidance.numpy.fill_next_token_bitmask_par(_executor(), matchers, rows)


@functools.cache
def _executor() -> llguidance.LLExecutor:
    # vLLM's own share for its mask threads: half the CPUs this process may use, at most 8
    # (the model workers, the API server and the compile pool run beside).
    return llguidance.LLExecutor(max(1, min(len(os.sched_getaffinity(0)) // 2, 8)))
