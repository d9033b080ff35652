"""What a constraint decides without the model: per index state, the text every allowed
continuation begins with, and tokens that spell it, proposed as speculative drafts.

Braces, quotes, key names and separators of a JSON document under a schema are decided by
the schema; decoding them one forward pass a token is overhead. A state's forced text is the
longest common prefix of every continuation the index allows from it: the prefix of one
allowed token is not enough (after `{` a schema may allow `"`, `"n`, `"name`... all of
which go on as `"name": `), so each token's bytes are followed by the forced text of the
state it leads to, within a byte budget. A state that may end (EOS allowed) or whose tokens
begin with different bytes forces nothing: only those whose tokens share a first byte are
explored, and most states of an index are the other kind. The tokens proposed for a forced
text are the longest allowed ones, state by state: where canonical.py narrowed the state,
the tokenizer's own token, the only one allowed; elsewhere what a BPE tokenizer writes in
nearly every case (a draft the model would not write is rejected by verification, never
forced). A state that can only end drafts EOS.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from dotllm.compiler.transitions import TransitionTable

MAX_FORCED_BYTES = 96
MAX_FORCED_TOKENS = 16


@dataclass(frozen=True)
class ForcedTable:
    """Per state, the draft tokens that spell its forced text (CSR, like transitions)."""
    offsets: np.ndarray  # int64 [N + 1]
    tokens: np.ndarray  # int32 [D]

    def tokens_from(self, state: int) -> np.ndarray:
        return self.tokens[self.offsets[state]:self.offsets[state + 1]]

    @property
    def nbytes(self) -> int:
        return self.offsets.nbytes + self.tokens.nbytes

    @classmethod
    def build(cls, transitions: TransitionTable, token_bytes: Mapping[int, bytes],
              eos_token_id: int, texts: Mapping[int, bytes] | None = None) -> ForcedTable:
        """`texts`: `forced_texts(transitions, token_bytes)`, where the caller has them."""
        t = transitions
        n = t.num_states
        texts = forced_texts(t, token_bytes) if texts is None else texts
        # A state that can only end (outlines-core lists EOS among its transitions): EOS.
        counts = np.diff(t.offsets)
        owner = np.repeat(np.arange(n), counts)
        others = np.bincount(owner[t.tokens != eos_token_id], minlength=n)
        ends = (t.finals == 1) & (others == 0)
        drafts: dict[int, list[int]] = {}
        for state in sorted({*texts, *np.flatnonzero(ends).tolist()}):
            tokens = _spell(t, token_bytes, state, texts.get(state, b""))
            if len(tokens) < MAX_FORCED_TOKENS:
                last = state
                for token in tokens:
                    last = t.next_state(last, token)
                if ends[last]:
                    tokens.append(eos_token_id)
            if tokens:
                drafts[state] = tokens
        offsets = np.zeros(n + 1, dtype=np.int64)
        for state, tokens in drafts.items():
            offsets[state + 1] = len(tokens)
        np.cumsum(offsets, out=offsets)
        flat = [token for state in sorted(drafts) for token in drafts[state]]
        return cls(offsets, np.array(flat, dtype=np.int32))


def forced_texts(t: TransitionTable, token_bytes: Mapping[int, bytes]) -> dict[int, bytes]:
    """Each state whose every continuation begins with the same text -> that text (up to
    MAX_FORCED_BYTES). A state that may end, or whose tokens begin with different bytes,
    forces nothing and is left out (most states of an index)."""
    n = t.num_states
    first = np.full(max(token_bytes, default=0) + 2, 256, dtype=np.int16)
    for token, b in token_bytes.items():
        first[token] = b[0]
    counts = np.diff(t.offsets)
    nonempty = np.flatnonzero(counts)
    candidate = np.zeros(n, dtype=bool)
    if len(nonempty):
        firsts = first[np.minimum(t.tokens, len(first) - 1)]
        starts = t.offsets[nonempty]
        low = np.minimum.reduceat(firsts, starts)
        candidate[nonempty] = (low == np.maximum.reduceat(firsts, starts)) & (low < 256)
    candidate &= t.finals == 0
    texts = _ForcedText(t, token_bytes, candidate)
    out = {}
    for state in np.flatnonzero(candidate).tolist():
        if text := texts.of(state, MAX_FORCED_BYTES):
            out[state] = text
    return out


class _ForcedText:
    """forced(s, budget): the longest common prefix, up to `budget` bytes, of every
    continuation from state s. Budgets fall along every path, so cycles end."""

    def __init__(self, t: TransitionTable, token_bytes: Mapping[int, bytes],
                 candidate: np.ndarray):
        self._t, self._bytes, self._candidate = t, token_bytes, candidate
        self._memo: dict[tuple[int, int], bytes] = {}

    def of(self, state: int, budget: int) -> bytes:
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 4 * MAX_FORCED_BYTES + 200))
        try:
            return self._forced(state, budget)
        finally:
            sys.setrecursionlimit(limit)

    def _forced(self, state: int, budget: int) -> bytes:
        if budget <= 0 or not self._candidate[state]:
            return b""
        key = (state, budget)
        if (known := self._memo.get(key)) is not None:
            return known
        t = self._t
        lo, hi = int(t.offsets[state]), int(t.offsets[state + 1])
        common: bytes | None = None
        for token, target in zip(t.tokens[lo:hi].tolist(), t.targets[lo:hi].tolist(),
                                 strict=True):
            b = self._bytes.get(token, b"")
            text = b[:budget] if len(b) >= budget else b + self._forced(target, budget - len(b))
            common = text if common is None else _common_prefix(common, text)
            if not common:
                break
        self._memo[key] = common or b""
        return self._memo[key]


def _common_prefix(a: bytes, b: bytes) -> bytes:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return a[:i]


def _spell(t: TransitionTable, token_bytes: Mapping[int, bytes], state: int,
           text: bytes) -> list[int]:
    """The longest allowed token that is a prefix of what is left, state by state."""
    out: list[int] = []
    while text and len(out) < MAX_FORCED_TOKENS:
        best, best_len = None, 0
        for token in t.tokens_from(state).tolist():
            b = token_bytes.get(token, b"")
            if len(b) > best_len and text.startswith(b):
                best, best_len = token, len(b)
        if best is None:
            break
        out.append(best)
        state = t.next_state(state, best)
        text = text[best_len:]
    return out
