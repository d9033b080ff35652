"""Forced continuations (dotllm/compiler/forced.py): what each index state decides without
the model, and the draft tokens that spell it. Checked against the index itself: every
draft is accepted from its state, and every continuation the index allows, walked at
random, agrees with the forced text."""

from __future__ import annotations

import random

import numpy as np
import pytest

from dotllm.compiler.compiled import CompiledIndex
from dotllm.compiler.spec import ConstraintSpec
from dotllm.guide import Guide

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "status": {"enum": ["pending", "paid", "shipped"]},
    "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
    "ok": {"type": "boolean"}}, "required": ["name", "status", "tags", "ok"]}


def _text(tokenizer, tokens) -> str:
    return tokenizer.decode([int(t) for t in tokens])


def test_a_literal_is_drafted_whole_then_eos(tokenizer, vocabulary):
    compiled = CompiledIndex.build("hello world", vocabulary)
    drafts = compiled.forced_tokens(compiled.initial_state).tolist()
    assert drafts[-1] == vocabulary.eos_token_id
    assert _text(tokenizer, drafts[:-1]) == "hello world"
    guide = Guide(compiled, vocabulary.eos_token_id)
    assert guide.accept_tokens(drafts) and guide.is_terminated()


def test_a_choice_forces_only_what_its_branches_share(tokenizer, vocabulary):
    compiled = CompiledIndex.build("(status: (pending|paid))", vocabulary)
    drafts = compiled.forced_tokens(compiled.initial_state)
    assert _text(tokenizer, drafts) == "status: p"
    guide = Guide(compiled, vocabulary.eos_token_id)
    guide.accept_tokens(drafts.tolist())
    assert compiled.forced_tokens(guide.state).size == 0  # "aid" or "ending": the model's


def test_json_keys_and_separators_are_drafted(tokenizer, vocabulary):
    spec = ConstraintSpec.json_schema(SCHEMA)
    compiled = CompiledIndex.build(spec.to_regex(), vocabulary, json_text=True)
    assert _text(tokenizer, compiled.forced_tokens(compiled.initial_state)) == '{"name":'
    guide = Guide(compiled, vocabulary.eos_token_id)
    for piece in ('{"name": "ab"', ', "status": "paid"'):
        for token in tokenizer.encode(piece, add_special_tokens=False):
            assert guide.accept_tokens([token])
    assert _text(tokenizer, compiled.forced_tokens(guide.state)) == ","  # then " " or not
    for piece in (",", " "):
        assert guide.accept_tokens(tokenizer.encode(piece, add_special_tokens=False))
    assert _text(tokenizer, compiled.forced_tokens(guide.state)) == '"tags":'


def test_round_trip_through_bytes_keeps_the_drafts(vocabulary):
    compiled = CompiledIndex.build(ConstraintSpec.json_schema(SCHEMA).to_regex(), vocabulary,
                                   json_text=True)
    again = CompiledIndex.from_buffer(compiled.to_bytes())
    assert np.array_equal(again.forced.offsets, compiled.forced.offsets)
    assert np.array_equal(again.forced.tokens, compiled.forced.tokens)
    assert compiled.forced.tokens.size > 0


@pytest.mark.parametrize("regex, json_text", [
    (ConstraintSpec.json_schema(SCHEMA).to_regex(), True),
    (ConstraintSpec.json_schema({"type": "array", "items": {"type": "integer"}}).to_regex(),
     True),
    (r"(\d{3}-){2}\d{4}|call me", False),
    ("(ab)*c(de|df)", False),
])
def test_every_continuation_agrees_with_the_drafts(vocabulary, regex, json_text):
    compiled = CompiledIndex.build(regex, vocabulary, json_text=json_text)
    t, eos = compiled.transitions, vocabulary.eos_token_id
    spelled = vocabulary.token_bytes
    rng = random.Random(0)
    drafted = [s for s in range(t.num_states) if compiled.forced_tokens(s).size]
    assert drafted
    for state in drafted:
        drafts = compiled.forced_tokens(state).tolist()
        guide = Guide(compiled, eos)
        guide._states = [state]  # start the walk there
        assert guide.validate_tokens(drafts) == drafts, state
        forced = b"".join(spelled.get(d, b"") for d in drafts if d != eos)
        for _ in range(20):  # a random continuation: it must write `forced` first
            walk, at = b"", state
            while len(walk) < len(forced):
                assert not t.finals[at], (state, walk, forced)
                token = rng.choice(t.tokens_from(at).tolist())
                walk += spelled[token]
                at = t.next_state(at, token)
            assert walk.startswith(forced), (state, walk, forced)
