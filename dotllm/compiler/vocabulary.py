"""The token vocabulary outlines-core compiles against, built once per tokenizer.

outlines-core matches regexes over the bytes each token decodes to. Byte-level BPE
tokenizers (GPT-2, Llama 3, Tekken) store tokens as printable stand-ins for bytes;
SentencePiece ones use `▁` for spaces and `<0xXX>` for raw bytes. Special and control
tokens (Tekken has ~1,000) are never text, so they are left out: a constraint can then
never produce them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import cache

import outlines_core

from dotllm.compiler.canonical import CanonicalEncoder

_SPM_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SPM_SPACE = "\u2581"


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character -> the byte it stands for."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


def token_bytes(tokenizer) -> dict[int, bytes]:
    """Each text token id -> the bytes it stands for (special tokens left out)."""
    special = set(getattr(tokenizer, "all_special_ids", []))
    special.update(
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special
    )
    byte_level = _is_byte_level(tokenizer)
    decoder = _byte_decoder()
    out: dict[int, bytes] = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id in special:
            continue
        if byte_level:
            if any(c not in decoder for c in token):
                continue  # an added non-special token in plain text
            out[token_id] = bytes(decoder[c] for c in token)
        elif m := _SPM_BYTE.match(token):
            out[token_id] = bytes([int(m.group(1), 16)])
        else:
            out[token_id] = token.replace(_SPM_SPACE, " ").encode("utf-8")
    return {i: b for i, b in out.items() if b}


@dataclass(frozen=True)
class Vocabulary:
    """outlines-core's Vocabulary plus what DotLLM keys caches and sizes masks by."""

    inner: outlines_core.Vocabulary
    eos_token_id: int
    size: int  # logits width: token ids are < size
    digest: str  # changes whenever any token's bytes, the EOS id or the tokenizer's splits do
    token_bytes: dict[int, bytes] = field(default_factory=dict, compare=False, repr=False)
    # A byte-level BPE tokenizer's `tokenizers` JSON: how it splits text, for canonical
    # forced runs (dotllm.compiler.canonical); None for any other tokenizer.
    tokenizer_json: str | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_tokenizer(cls, tokenizer, size: int | None = None) -> Vocabulary:
        eos = tokenizer.eos_token_id
        table = token_bytes(tokenizer)
        grouped: dict[bytes, list[int]] = {}
        for token_id, b in sorted(table.items()):
            grouped.setdefault(b, []).append(token_id)
        h = hashlib.sha256(f"eos={eos};".encode())
        for b, ids in sorted(grouped.items()):
            h.update(len(b).to_bytes(4, "little") + b + repr(ids).encode())
        tokenizer_json = None
        if _is_byte_level(tokenizer):
            tokenizer_json = tokenizer.backend_tokenizer.to_str()
            h.update(b"tokenizer=" + tokenizer_json.encode())  # merges and splits matter
        size = size if size is not None else max(len(tokenizer), max(table) + 1, eos + 1)
        return cls(outlines_core.Vocabulary(eos, grouped), eos, size, h.hexdigest()[:32],
                   table, tokenizer_json)

    def encoder(self) -> CanonicalEncoder | None:
        """The tokenizer's own encoding where it writes bytes back as given, else None
        (built once per process and vocabulary)."""
        if self.tokenizer_json is None:
            return None
        if self.digest not in _encoders:
            encoder = CanonicalEncoder(self.tokenizer_json)
            _encoders[self.digest] = encoder if encoder.writes_bytes_back(self.token_bytes) \
                else None
        return _encoders[self.digest]


_encoders: dict[str, CanonicalEncoder | None] = {}
