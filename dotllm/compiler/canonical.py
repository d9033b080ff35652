"""Canonical forced runs: where the constraint decides the next bytes, the index allows
only the token the tokenizer itself would write there.

outlines-core's index allows every tokenization of a text: after `{` under a schema with
a required `name`, `"`, `"n`, `"na`, `"name`... A model trained on its tokenizer's own
output seldom writes the others, and a draft of the forced text (dotllm.compiler.forced)
lands only where the model's masked choice is the draft's token. llguidance allows only
the tokenizer's own tokens there; the index now does too: a state with forced text allows
the one token the tokenizer writes next, so drafts are the only choice and the tiers agree
on forced text. What the constraint accepts as text is unchanged: the token kept begins
every continuation the state had.

The tokenizer decides by context. Here the context is each token that enters the state
(`{"` + `name` but `"name` alone), and what may follow the forced text (a probe of each
kind of byte: the last piece of forced text can merge with what comes after, `":` + `"` is
`":"`). A state is narrowed only where every such context in which the entering token
stays whole agrees on a token that ends inside the forced text; anything else (a state
entered in many ways, a tokenizer that does not write bytes back as given) keeps every
token. Byte-level BPE tokenizers only (`tokenizers` JSON).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import numpy as np

from dotllm.compiler.transitions import TransitionTable

MAX_CONTEXTS = 8  # tokens entering a state that are tried; a state with more is left as is
# What may follow forced text: a string, a space, a word, a number, structure, a line.
PROBES = (b"", b'"', b" ", b"a", b"A", b"0", b"-", b"{", b"[", b"}", b"]", b",", b"\n")


class CanonicalEncoder:
    """The tokenizer's own encoding of text (a `tokenizers` JSON)."""

    def __init__(self, tokenizer_json: str):
        import tokenizers

        self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)

    def encode(self, texts: list[str]) -> list[list[int]]:
        # One at a time: encode_batch would start a thread pool in a compile worker whose
        # address space is capped (~5 us a short text either way).
        encode = self._tokenizer.encode
        return [encode(text, add_special_tokens=False).ids for text in texts]

    def writes_bytes_back(self, token_bytes: Mapping[int, bytes]) -> bool:
        """Whether encoding keeps text as given (no added prefix space, no normalization):
        only then is an encoding's next token a choice about the same bytes."""
        probe = '{"a": [1, -2.5e3, "x y", true], "Bb":null}\n  ,"c"'
        ids = self.encode([probe])[0]
        return b"".join(token_bytes.get(i, b"\0") for i in ids) == probe.encode()


def narrow_forced_runs(t: TransitionTable, token_bytes: Mapping[int, bytes],
                       texts: Mapping[int, bytes], encoder: CanonicalEncoder
                       ) -> TransitionTable:
    """`t` with each state of forced text `texts[state]` narrowed to the tokenizer's token."""
    entering = _entering_tokens(t, np.fromiter(texts, dtype=np.int64, count=len(texts)))
    jobs: list[tuple[int, int, str]] = []  # (state, entering token or -1, text)
    for state, text in texts.items():
        contexts = entering.get(state, [])
        if len(contexts) > MAX_CONTEXTS:
            continue
        if state == t.initial_state:
            contexts = [-1, *contexts]  # the start of the output
        for token in contexts:
            before = token_bytes.get(token) if token >= 0 else b""
            if before is None:  # EOS or a special token: not text
                continue
            for probe in PROBES:
                with contextlib.suppress(UnicodeDecodeError):  # forced text ends mid-character
                    jobs.append((state, token, (before + text + probe).decode("utf-8")))
    choice: dict[int, bytes | None] = {}  # the token's bytes (a vocabulary may repeat them)
    for (state, token, _), ids in zip(jobs, encoder.encode([j[2] for j in jobs]), strict=True):
        if token >= 0:
            if not ids or token_bytes.get(ids[0]) != token_bytes[token]:
                continue  # entering by `token` is itself not the tokenizer's writing
            ids = ids[1:]
        nxt = token_bytes.get(ids[0], b"") if ids else b""
        if not (0 < len(nxt) < len(texts[state]) and texts[state].startswith(nxt)):
            choice[state] = None  # it may merge with what follows the forced text
        elif choice.setdefault(state, nxt) != nxt:
            choice[state] = None
    # (Per-state arithmetic only: an index may hold tens of millions of transitions.)
    keep = np.ones(len(t.tokens), dtype=bool)
    counts = np.diff(t.offsets)
    for state, chosen in choice.items():
        lo, hi = int(t.offsets[state]), int(t.offsets[state + 1])
        same = [token_bytes.get(token) == chosen for token in t.tokens[lo:hi].tolist()]
        if chosen is not None and any(same):
            keep[lo:hi] = same
            counts[state] = sum(same)
    if keep.all():
        return t
    offsets = np.zeros_like(t.offsets)
    np.cumsum(counts, out=offsets[1:])
    return TransitionTable(t.initial_state, t.finals, offsets, t.tokens[keep], t.targets[keep])


def _entering_tokens(t: TransitionTable, states: np.ndarray) -> dict[int, list[int]]:
    """For each of `states`, the distinct tokens (up to MAX_CONTEXTS + 1) that lead into it
    from another state or itself."""
    wanted = np.zeros(t.num_states, dtype=bool)
    wanted[states] = True
    into = wanted[t.targets]
    out: dict[int, list[int]] = {}
    for target, token in zip(t.targets[into].tolist(), t.tokens[into].tolist(), strict=True):
        tokens = out.setdefault(target, [])
        if len(tokens) <= MAX_CONTEXTS and token not in tokens:
            tokens.append(token)
    return out
