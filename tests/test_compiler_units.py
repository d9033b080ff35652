"""Constraint specs, the vocabulary, per-state mask tables and compiled-index bytes."""

from __future__ import annotations

import json
import re

import numpy as np
import outlines_core
import pytest
import torch

from dotllm.compiler.compiled import CompiledIndex, CorruptEntry, outlines_index
from dotllm.compiler.mask_table import MaskTable, pack_tokens, words_for
from dotllm.compiler.memo import Memo
from dotllm.compiler.spec import ConstraintError, ConstraintKind, ConstraintSpec
from dotllm.compiler.transitions import TransitionTable
from dotllm.compiler.vocabulary import Vocabulary, token_bytes

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def test_same_schema_other_key_order_or_whitespace_same_key():
    a = ConstraintSpec.json_schema(json.dumps(PERSON))
    b = ConstraintSpec.json_schema(json.dumps(
        {"required": ["name", "age"], "properties": PERSON["properties"], "type": "object"},
        indent=4))
    assert a.key == b.key
    assert a.to_regex() == b.to_regex()


def test_property_order_is_part_of_the_key():
    swapped = dict(PERSON, properties=dict(reversed(list(PERSON["properties"].items()))))
    a, b = ConstraintSpec.json_schema(PERSON), ConstraintSpec.json_schema(swapped)
    assert a.key != b.key
    assert a.to_regex().index('"name"') < a.to_regex().index('"age"')
    assert b.to_regex().index('"age"') < b.to_regex().index('"name"')


def test_whitespace_pattern_changes_key_and_regex():
    a = ConstraintSpec.json_schema(PERSON)
    b = ConstraintSpec.json_schema(PERSON, whitespace_pattern="")
    assert a.key != b.key
    assert "[ ]?" in a.to_regex() and "[ ]?" not in b.to_regex()


@pytest.mark.parametrize("text, default, outlines", [
    ('{"n": 1, "xs": [1, 2], "o": {}}', True, True),
    ('{"n":1,"xs":[1,2]}', True, True),
    ('{"n" : 1}', False, True), ('{ "n": 1 }', False, True),
    ('{"n": 1 , "xs": [ 1 ]}', False, True),
    ('{"n": 1, "p": "a :b"}', True, True)])  # a pattern's own spaces stay
def test_the_default_layout_is_json_dumps_s(text, default, outlines):
    schema = {"type": "object", "required": ["n"], "properties": {
        "n": {"type": "integer"}, "xs": {"type": "array", "items": {"type": "integer"}},
        "o": {"type": "object"}, "p": {"type": "string", "pattern": "^a ?:b$"}}}
    for whitespace, expected in ((None, default), ("[ ]?", outlines)):
        regex = ConstraintSpec.json_schema(schema, whitespace_pattern=whitespace).to_regex()
        assert bool(re.fullmatch(regex, text)) == expected, (whitespace, text)


def test_kinds_differ_in_key():
    keys = {ConstraintSpec.regex("yes|no").key, ConstraintSpec.choice(["yes", "no"]).key,
            ConstraintSpec.json_object().key}
    assert len(keys) == 3


def test_choice_regex_escapes():
    spec = ConstraintSpec.choice('["a.b", "(c)"]')
    assert spec.kind is ConstraintKind.CHOICE
    assert spec.to_regex() == r"(a\.b)|(\(c\))"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ConstraintSpec.json_schema("{not json"), "not valid JSON"),
        (lambda: ConstraintSpec.json_schema("[1, 2]"), "object or a boolean"),
        (lambda: ConstraintSpec.json_schema({"type": "foo"}).to_regex(), "not a JSON type"),
        (lambda: ConstraintSpec.regex(""), "non-empty"),
        (lambda: ConstraintSpec.regex("(a").to_regex(), "invalid regex"),
        (lambda: ConstraintSpec.choice([]), "non-empty list"),
        (lambda: ConstraintSpec.choice(["a", 1]), "every choice must be a string"),
        (lambda: ConstraintSpec.choice("nope"), "not a JSON list"),
        (lambda: ConstraintSpec.regex("a" * 70000), "over the limit of 65,536"),
        (lambda: ConstraintSpec.regex("[").check(), "invalid regex"),
    ],
)
def test_invalid_constraints_name_the_problem(make, message):
    with pytest.raises(ConstraintError, match=message):
        make()


def test_vocabulary_bytes_round_trip_text(tokenizer, vocabulary):
    table = token_bytes(tokenizer)
    text = 'Héllo {"a": [1, 2.5e3]} 日本語 ✓'
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(table[i] for i in ids).decode() == text
    assert vocabulary.size == 131072
    assert vocabulary.eos_token_id == tokenizer.eos_token_id


def test_special_and_control_tokens_are_never_text(tokenizer):
    table = token_bytes(tokenizer)
    assert min(table) >= 1000  # Tekken's first 1,000 ids are control tokens
    for token in ("<s>", "</s>", "[INST]", "[/INST]"):
        assert tokenizer.convert_tokens_to_ids(token) not in table


def test_vocabulary_digest_is_stable_and_content_sensitive(tokenizer, vocabulary):
    assert Vocabulary.from_tokenizer(tokenizer).digest == vocabulary.digest

    class Shifted:
        eos_token_id = 3
        all_special_ids: list[int] = []
        added_tokens_decoder: dict = {}
        backend_tokenizer = None

        def get_vocab(self):
            return {"a": 4, "b": 5}

        def __len__(self):
            return 6

    other = Vocabulary.from_tokenizer(Shifted())
    assert other.digest != vocabulary.digest
    assert other.size == 6


def test_pack_tokens_layout():
    row = pack_tokens(np.array([0, 31, 32, 69]), 70)
    assert row.dtype == np.int32 and len(row) == words_for(70) == 3
    assert row[0] == np.int32(1 | (1 << 31) - (1 << 32))  # bits 0 and 31
    assert row[1] == 1
    assert row[2] == 1 << 5


def test_mask_table_matches_outlines_guide_in_every_state(vocabulary):
    regex = ConstraintSpec.json_schema(PERSON).to_regex()
    index = outlines_index(regex, vocabulary.inner, json_text=True)
    transitions = TransitionTable.from_index(index)
    table = MaskTable.build(transitions, vocabulary.size, vocabulary.eos_token_id)
    assert table.rows.flags["C_CONTIGUOUS"] and table.rows.dtype == np.int32
    assert len(table.rows) < len(table.state_rows)  # identical masks are stored once
    buf = torch.zeros(words_for(vocabulary.size), dtype=torch.int32)
    outlines_transitions = index.get_transitions()
    for state, moves in outlines_transitions.items():
        guide = outlines_core.Guide(index)
        # Reach `state` by walking any path, in both; compare transitions and masks there.
        ours = transitions.initial_state
        for token in _path_to(index, state):
            guide.advance(token)
            ours = transitions.next_state(ours, token)
        assert transitions.tokens_from(ours).tolist() == sorted(moves)
        assert transitions.next_state(ours, max(moves) + 1) is None
        guide.write_mask_into(buf.data_ptr(), buf.numel(), 4)
        assert np.array_equal(buf.numpy(), table.row(ours)), state
    assert transitions.num_states == len(outlines_transitions)


def _path_to(index, target: int) -> list[int]:
    transitions = index.get_transitions()
    start = index.get_initial_state()
    frontier, seen = [(start, [])], {start}
    while frontier:
        state, path = frontier.pop(0)
        if state == target:
            return path
        for token, nxt in transitions.get(state, {}).items():
            if nxt not in seen:
                seen.add(nxt)
                frontier.append((nxt, [*path, token]))
    raise AssertionError(f"state {target} unreachable")


@pytest.mark.parametrize(("spec", "text"), [
    (ConstraintSpec.regex("(true|false)(, (true|false))*"), "true, false, true"),
    (ConstraintSpec.regex("[0-9]+(\\.[0-9]+)?"), "12.5"),
    (ConstraintSpec.choice(["a", "ab", "abc d"]), "ab"),
    (ConstraintSpec.choice(["a", "ab", "abc d"]), "abc d"),
    (ConstraintSpec.json_schema({"anyOf": [{"type": "integer"}, {"type": "number"}]}), "-1.5"),
])
def test_the_index_goes_on_from_a_state_where_it_may_end(vocabulary, tokenizer, spec, text):
    """Where the text so far is complete, the index still allows what continues it (raw
    outlines-core 0.2.14 allows only EOS after `true` here, and writes only "a")."""
    compiled = CompiledIndex.for_spec(spec, vocabulary)
    one_byte = {b: i for i, b in token_bytes(tokenizer).items() if len(b) == 1}
    for tokens in (tokenizer.encode(text, add_special_tokens=False),
                   [one_byte[bytes([b])] for b in text.encode()]):
        state = compiled.initial_state
        for token in tokens:
            state = compiled.next_state(state, token)
            assert state is not None, (text, tokenizer.decode(tokens))
        assert compiled.is_final(state)


@pytest.mark.parametrize(("text", "whole"), [
    ('{"x": 1e5}', True), ('{"x": -2.5E12}', True), ('{"x": 3e+4}', True),
    ('{"x": 7e-1}', True), ('{"x": 1e}', False)])
def test_a_numbers_exponent_is_as_json_writes_it(vocabulary, tokenizer, text, whole):
    """`1e5` as llguidance writes it (outlines-core wanted `1e+5`: hand-overs were refused);
    an exponent without digits is still no number."""
    compiled = CompiledIndex.for_spec(ConstraintSpec.json_schema(
        {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}),
        vocabulary)
    state = compiled.initial_state
    for token in tokenizer.encode(text, add_special_tokens=False):  # as the model writes it
        state = compiled.next_state(state, token)
        if state is None:
            break
    assert (state is not None and compiled.is_final(state)) == whole


def test_compiled_index_bytes_round_trip(vocabulary):
    compiled = CompiledIndex.build("[0-9]{1,3}", vocabulary)
    again = CompiledIndex.from_buffer(compiled.to_bytes())
    for name in ("rows", "state_rows"):
        assert np.array_equal(getattr(again.table, name), getattr(compiled.table, name))
    for name in ("finals", "offsets", "tokens", "targets"):
        assert np.array_equal(getattr(again.transitions, name),
                              getattr(compiled.transitions, name))
    assert again.initial_state == compiled.initial_state


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[:-1], "truncated"),
        (lambda b: b[:20], "shorter than its header"),
        (lambda b: b + b"x", "truncated or padded"),
        (lambda b: b"X" + b[1:], "not a DotLLM index"),
        (lambda b: _flip(b, 200), "checksum mismatch"),  # in the per-state arrays
    ],
)
def test_damaged_bytes_are_detected(vocabulary, damage, message):
    data = CompiledIndex.build("ab|cd", vocabulary).to_bytes()
    with pytest.raises(CorruptEntry, match=message):
        CompiledIndex.from_buffer(damage(data))


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def test_a_damaged_block_is_refused_when_first_needed(vocabulary, tokenizer):
    """Blocks are checked lazily: loading stays O(states), a bad block still never serves."""
    compiled = CompiledIndex.build('"[^"]*"', vocabulary)
    quote = tokenizer.encode('"', add_special_tokens=False)[0]
    inside = compiled.next_state(compiled.initial_state, quote)
    assert len(compiled.transitions.tokens_from(inside)) > 65536  # spans several blocks
    data = compiled.to_bytes()
    rows_at = len(data) - compiled.table.rows.nbytes
    row_bytes = compiled.table.rows.shape[1] * 4
    inside_row = int(compiled.table.state_rows[inside])
    assert inside_row != int(compiled.table.state_rows[compiled.initial_state])
    damaged = {
        "mask row": _flip(data, rows_at + inside_row * row_bytes + 7),
        # A target 3/4 of the way in (padding < 64 bytes separates them from the rows).
        "transitions block": _flip(data, rows_at - 64 - compiled.transitions.targets.nbytes // 4),
    }
    for what, bad in damaged.items():
        loaded = CompiledIndex.from_buffer(bad)  # the initial state's blocks are intact
        reasons = []
        loaded.on_corrupt = reasons.append
        with pytest.raises(CorruptEntry, match=what):
            loaded.next_state(loaded.initial_state, quote)
        assert len(reasons) == 1 and what in reasons[0]
    intact = CompiledIndex.from_buffer(data)
    assert intact.next_state(intact.initial_state, quote) == inside


def test_what_no_engine_enforces_is_named_with_where_it_is():
    from dotllm.compiler.enforcement import never_enforced

    schema = {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0},  # both engines enforce it
            "not": {"type": "string"},  # a property *named* like a keyword is fine
            "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
            "one": {"type": "array", "uniqueItems": True, "maxItems": 1},  # always unique
            "site": {"type": "string", "format": "url"},
            "word": {"type": "string", "pattern": r"\bword"},
        },
        "additionalProperties": False,
        "$defs": {"a/b": {"not": {"type": "null"}}},
        "enum": [{"uniqueItems": True}],  # values are data, not schemas
    }
    assert [str(u) for u in never_enforced(schema)] == [
        "uniqueItems at /properties/tags", "format at /properties/site",
        "pattern at /properties/word", "not at /$defs/a~1b"]
    assert not never_enforced({"type": "array", "uniqueItems": False})
    with pytest.raises(ConstraintError, match="no engine here enforces: uniqueItems at "
                                              "/properties/tags, format at"):
        ConstraintSpec.json_schema(schema).check()
    minimum = ConstraintSpec.json_schema({"properties": {"age": {"minimum": 0}}})
    assert minimum.outlines_refusal().endswith(
        "exactly: minimum at /properties/age without a type")
    assert minimum.outlines_refusal_reason == "keywords"
    with pytest.raises(ConstraintError, match="exactly: minimum at /properties/age"):
        minimum.to_regex()
    assert ConstraintSpec.json_schema({"type": "integer"}).outlines_refusal() is None
    assert "does not compile grammar" in ConstraintSpec.grammar('start: "a"').outlines_refusal()


def test_a_schemas_outlines_refusal_is_rewritten_once_and_remembered(monkeypatch):
    """Every request on a schema asks (API server, engine); the rewriting it takes ran for
    each, warm index or not. Remembered by key, least recently used out first."""
    from dotllm.compiler import outlines_schema
    from dotllm.compiler import spec as spec_module

    calls = []
    normalize = outlines_schema.normalize  # once a rewriting, at its start
    monkeypatch.setattr(outlines_schema, "normalize",
                        lambda schema: calls.append(1) or normalize(schema))
    monkeypatch.setattr(spec_module, "_refusals", Memo(2))
    served = {"type": "object", "properties": {"n": {"type": "integer"}}}
    refused = {"properties": {"age": {"minimum": 0}}}
    for _ in range(3):  # a new spec object each time, as each request makes
        assert ConstraintSpec.json_schema(served).outlines_refusal() is None
        assert "minimum at /properties/age" in ConstraintSpec.json_schema(
            refused).outlines_refusal()
        # The relaxation's question (the API server asks both) is the same answer.
        assert ConstraintSpec.json_schema(served).outlines_refusal_error() is None
        error = ConstraintSpec.json_schema(refused).outlines_refusal_error()
        assert (error.keyword, error.pointer) == ("minimum", "/properties/age")
        assert error.__traceback__ is None
    assert len(calls) == 2
    # A different layout is another key, with the same answer.
    assert ConstraintSpec.json_schema(served, whitespace_pattern="").outlines_refusal() is None
    assert len(calls) == 3
    assert len(spec_module._refusals) == 2  # the oldest (`served`, default layout) went
    assert ConstraintSpec.json_schema(served).outlines_refusal() is None
    assert len(calls) == 4


def test_check_never_builds_the_regex(monkeypatch):
    """A small schema can expand to a regex of many megabytes; the API server only checks."""
    from dotllm.compiler import spec as spec_module

    def forbidden(*args):
        raise AssertionError("check() built the regex")

    monkeypatch.setattr(spec_module, "build_regex_from_schema", forbidden)
    schema = {"$defs": {"leaf": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
              "type": "object"}
    for level in range(6):
        schema["$defs"][f"l{level}"] = {"type": "object", "properties": {
            f"p{i}": {"$ref": f"#/$defs/{'leaf' if level == 0 else f'l{level - 1}'}"}
            for i in range(8)}}
    schema["properties"] = {"root": {"$ref": "#/$defs/l5"}}
    spec = ConstraintSpec.json_schema(schema)
    spec.check()  # to_regex would expand 8**6 leaves: rewriting stops at its budget
    assert "once its $refs are expanded" in spec.outlines_refusal()
    small = ConstraintSpec.json_schema({"properties": {"a": {"$ref": "#/$defs/x"}},
                                        "$defs": {"x": {"type": "string"}}})
    small.check()
    with pytest.raises(AssertionError, match="built the regex"):
        small.to_regex()
