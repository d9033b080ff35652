"""ECMA-262 patterns as both engines read them (`dotllm.compiler.ecma_regex`), and the
formats DotLLM enforces (`dotllm.compiler.formats`).

Each translated regex is checked the way the server runs it: outlines-core builds an
index over the embedded model's vocabulary and walks the string's tokens. Formats are
checked by generating from an index over a one-byte-a-token vocabulary (they are ASCII)
and asking `jsonschema`'s format checker.
"""

from __future__ import annotations

import json
import random

import outlines_core
import pytest

from dotllm.compiler import ecma_regex, formats
from dotllm.compiler.compiled import outlines_index
from dotllm.compiler.ecma_regex import Mode, UnsupportedRegex, translate
from dotllm.compiler.errors import ConstraintError
from dotllm.compiler.validation import FORMAT_CHECKER

EOS = 256
BYTES = outlines_core.Vocabulary(EOS, {bytes([b]): [b] for b in range(256)})


@pytest.fixture(scope="module")
def matches(tokenizer, vocabulary):
    def matches(regex: str, text: str) -> bool:
        index = outlines_index(regex, vocabulary.inner)
        state = index.get_initial_state()
        for token in tokenizer.encode(text, add_special_tokens=False):
            state = index.get_next_state(state, token)
            if state is None:
                return False
        return index.is_final_state(state)

    return matches


@pytest.mark.parametrize(("pattern", "accepted", "refused"), [
    (r"[a-z]{3}-\d{4}", ["kot-2024"], ["kot-۰０೬૦", "kot-12345"]),
    (r"\w+", ["a_Z9"], ["é", "a-b"]),
    (r"\W", ["é", "-"], ["a", "_"]),
    (r"\s", [" ", "\t", "\u00a0", "\ufeff", "\u2028"], ["\u0085", "x"]),  # NEL is not
    (r"\S+", ["\u0085", "ab"], ["a b", "a\u00a0"]),
    (r"a.b", ["a\"b", "aéb"], ["a\nb", "a\u2028b"]),
    (r"[^\d\s]", ["x", "é", "٣"], ["1", " "]),  # ECMA's \d is ASCII
    (r"[\d-z]", ["5", "-", "z"], ["y"]),
    (r"^ab|cd$", ["ab", "cd"], ["abcd", "xcd"]),
    (r"(?<year>\d{4})-?", ["2024", "2024-"], ["2024-5"]),
    (r"1(-2)?", ["1", "1-2"], ["1-"]),  # on from a state that may end (outlines_index)
    (r"a{2", ["a{2"], ["aa"]),
    (r"\u00e9\x41\/\cJ", ["éA/\n"], ["\\u00e9"]),
    (r"\uD83D\uDE00", ["😀"], ["\\uD83D"]),
    (r"[]a|b", ["b"], ["a"]),
])
def test_whole_string_matches_read_as_ecma(matches, pattern, accepted, refused):
    regex = translate(pattern, Mode.FULL)
    for text in accepted:
        assert matches(regex, text), (pattern, regex, text)
    for text in refused:
        assert not matches(regex, text), (pattern, regex, text)


@pytest.mark.parametrize(("pattern", "accepted", "refused"), [
    (r"^[^a]+$", ['\\"', "\\\\", 'x\\"y'], ['"', "\\", "a"]),
    (r"a\nb", ["a\\nb"], ["a\nb"]),
    (r'"x"', ['\\"x\\"'], ['"x"']),
    (r"[\p{L}]+", ["éa"], ["1"]),
    (r"[^\p{L}]", ["1"], ['"', "é", "\x01"]),
])
def test_json_body_writes_what_a_string_cannot_hold_raw_escaped(matches, pattern, accepted,
                                                               refused):
    """outlines-core splices a pattern between two quotes: the JSON text of the body."""
    regex = translate(pattern, Mode.JSON_BODY)
    for text in accepted:
        assert matches(regex, text), (pattern, regex, text)
    for text in refused:
        assert not matches(regex, text), (pattern, regex, text)


def test_search_mode_keeps_json_schemas_meaning():
    assert translate(r"^\d+$", Mode.SEARCH) == "^[0-9]+$"
    assert translate(r"ab", Mode.SEARCH) == "ab"  # a match anywhere: llguidance searches
    # newlines too (unlike llguidance's own padding), but not what a name escapes
    anything = "[\\x20-!\\#-\\[\\]-\\x{D7FF}\\x{E000}-\\x{10FFFF}]*"
    assert translate(r"^x|y", Mode.SEARCH_AS_FULL) == f"^(?:x){anything}|{anything}(?:y){anything}"
    # found anywhere, a repeat at an unanchored edge needs only its least count
    assert translate(r"[A-Z]{1,255}", Mode.SEARCH_AS_FULL) == f"{anything}(?:[A-Z]{{1}}){anything}"
    assert translate(r"^a+b*", Mode.SEARCH_AS_FULL) == f"^(?:a{{1}}){anything}"
    no_escapes = "[!\\#-\\[\\]-\\x{D7FF}\\x{E000}-\\x{10FFFF}]"
    assert translate(r'^[^ "]$', Mode.SEARCH_AS_FULL) == f"^(?:{no_escapes})$"


@pytest.mark.parametrize(("pattern", "feature"), [
    (r"a(?=b)", "look-around"), (r"(?<!a)b", "look-around"), (r"(a)\1", "back reference"),
    (r"\bword", "word boundary"), (r"a^b", "anchor"), (r"a$b", "anchor"),
    (r"(?i)abc", "inline flag"),
])
def test_what_no_engine_matches_is_named(pattern, feature):
    for mode in Mode:
        with pytest.raises(UnsupportedRegex, match=feature):
            translate(pattern, mode)


@pytest.mark.parametrize("pattern", ["(a", "a)", "[a", "*a", "a**", "[z-a]", r"\u{110000}"])
def test_invalid_patterns_are_client_errors(pattern):
    with pytest.raises(ConstraintError, match="invalid regex"):
        ecma_regex.parse(pattern)


def sample(index: outlines_core.Index, rng: random.Random, length: int) -> str | None:
    """A random string of `index`'s language, ending as soon as it may after `length`
    steps (and heading for an end from there)."""
    transitions = index.get_transitions()
    state, out = index.get_initial_state(), bytearray()
    for step in range(4 * length + 64):
        moves = transitions.get(state, {})
        if EOS in moves and (step >= length or len(moves) == 1):
            return out.decode()
        choices = [t for t in moves if t != EOS]
        if not choices:
            return None
        if step >= length:  # past it, end where one byte more may end
            choices = [t for t in choices if EOS in transitions.get(moves[t], {})] or choices
        token = rng.choice(choices)
        out.append(token)
        state = moves[token]
    return None


@pytest.mark.parametrize("name", sorted(formats.ENFORCED))
def test_every_string_a_format_allows_is_valid(name):
    """The pattern is a subset of the format: what it generates, jsonschema accepts."""
    # In quotes, as in a JSON string: a text that ends by itself, exact unanchored.
    index = outlines_index(f'"(?:{translate(formats.pattern_for(name), Mode.FULL)})"', BYTES,
                           json_text=True)
    rng = random.Random(name)
    texts = [t[1:-1] for t in (sample(index, rng, rng.randrange(1, 40)) for _ in range(300))
             if t]
    assert len(texts) > 250
    invalid = [t for t in texts if not FORMAT_CHECKER.conforms(t, name)]
    assert not invalid, invalid[:5]


def test_dates_are_real_days(matches):
    regex = translate(formats.pattern_for("date"), Mode.FULL)
    for day in ("2024-02-29", "2000-02-29", "0001-01-01", "9999-12-31"):
        assert matches(regex, day), day
    for day in ("2023-02-29", "1900-02-29", "2024-04-31", "0000-01-01", "2024-13-01"):
        assert not matches(regex, day), day


def test_a_format_reads_alike_in_a_json_string(matches):
    body = translate(formats.pattern_for("email"), Mode.JSON_BODY)
    assert matches(body, "a.b@example.com") and not matches(body, '"a"@b')
    assert json.loads(f'"{"a.b@example.com"}"') == "a.b@example.com"
