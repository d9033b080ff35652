"""Where llguidance's lexer would give up on a schema, found before a request runs.

llguidance builds its lexer lazily. A string with a `pattern` *and* a length bound is one
regex intersected with `.{min,max}`, and some such pairs (`^(?:\\S+\\s+){0,99}\\S+$` with
`maxLength: 5000`, a real schema) pass every grammar check and then stop the matcher a
few characters into the string ("too many expressions constructed"): the request fails
mid-answer. The same pattern alone is cheap. So each such string is tried on a
byte-level tokenizer (the blow-up is the regex's, not the vocabulary's: it shows there in
a few milliseconds), and where the lexer gives up the length bounds are what a
non-strict request leaves unenforced (`relaxation`), the pattern still enforced.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass

import llguidance
import llguidance.numpy
import numpy as np

from dotllm.compiler import enforcement
from dotllm.compiler.enforcement import Unenforced
from dotllm.compiler.llguidance_grammar import for_llguidance, json_options

LENGTHS = ("minLength", "maxLength")
MAX_PROBED = 32  # strings probed a schema; past them the engine's own error stands
STEPS, TRIES = 24, 3  # bytes into the string, times (the blow-ups seen came by byte 3)
_QUOTE, _EOS = ord('"'), 256


@dataclass
class LexerLimit:
    pointer: str
    keywords: list[str]  # the length bounds beside the pattern
    error: str

    @property
    def unenforced(self) -> list[Unenforced]:
        return [Unenforced(k, self.pointer) for k in self.keywords]

    def __str__(self) -> str:
        return (f"pattern at {self.pointer or '/'} with {', '.join(self.keywords)}: past "
                f"llguidance's lexer limits ({self.error})")


class _Bytes:
    """A tokenizer of one token a byte, and EOS: what `TokenizerWrapper` wraps."""

    eos_token_id = _EOS
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"</s>"]

    def __call__(self, text: str) -> list[int]:
        return list(text.encode())


@functools.cache
def _tokenizer() -> llguidance.LLTokenizer:
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bytes()))


def beyond_lexer(schema) -> list[LexerLimit]:
    """The strings of `schema` (a pattern beside a length bound) on which llguidance's
    lexer gives up."""
    found: list[LexerLimit] = []
    probed = 0
    for node, pointer in enforcement.nodes(schema):
        keywords = [k for k in LENGTHS if isinstance(node.get(k), int)]
        if not (isinstance(node.get("pattern"), str) and keywords):
            continue
        if probed == MAX_PROBED:
            break
        probed += 1
        string = {"type": "string", "pattern": node["pattern"], **{k: node[k] for k in keywords}}
        if (error := _gives_up(json.dumps(string, sort_keys=True))) is not None:
            found.append(LexerLimit(pointer, keywords, error))
    return found


@functools.lru_cache(maxsize=1024)
def _gives_up(string_schema: str) -> str | None:
    """llguidance's error a few random bytes into a string of `string_schema`, if any."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            for_llguidance(json.loads(string_schema)), defaults=json_options(None))
    except (ValueError, TypeError):
        return None  # not llguidance's lexer: the grammar checks say what is wrong
    tokenizer = _tokenizer()
    row = np.zeros((1, (tokenizer.vocab_size + 31) // 32), dtype=np.int32)
    for seed in range(TRIES):
        rng = random.Random(seed)
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            return None  # not llguidance's lexer: the grammar checks say what is wrong
        matcher.consume_token(_QUOTE)
        for _ in range(STEPS):
            llguidance.numpy.fill_next_token_bitmask(matcher, row, 0)
            if matcher.is_error():
                break
            bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:_EOS]
            allowed = np.flatnonzero(bits)
            inside = allowed[allowed != _QUOTE]  # stay in the string while it may go on
            if not len(inside):
                break
            matcher.consume_token(int(inside[rng.randrange(len(inside))]))
        if matcher.is_error():  # the line that says why, not the state dump after it
            return matcher.get_error().split("\n", 1)[0].removeprefix("lexer error: ")
    return None
