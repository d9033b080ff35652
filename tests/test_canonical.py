"""Canonical forced runs (dotllm/compiler/canonical.py): where a constraint decides the next
bytes, the index allows the token the tokenizer writes there, and only that; what it
accepts as text, and the tokenizer's own writing of any document, stay allowed."""

from __future__ import annotations

import json
import random

import pytest

from dotllm.compiler.canonical import CanonicalEncoder, narrow_forced_runs
from dotllm.compiler.compiled import CompiledIndex, outlines_index
from dotllm.compiler.forced import forced_texts
from dotllm.compiler.spec import ConstraintSpec
from dotllm.compiler.transitions import TransitionTable
from dotllm.compiler.vocabulary import Vocabulary

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "description": {"type": "string"},
    "size": {"enum": ["small", "medium", "large"]},
    "count": {"type": "integer"}},
    "required": ["name", "description", "size", "count"], "additionalProperties": False}
DOCUMENT = {"name": "Bob", "description": "a tall man", "size": "medium", "count": 12}


def _both(spec: ConstraintSpec, vocabulary: Vocabulary):
    """The index's transitions as outlines-core gives them, and narrowed."""
    index = outlines_index(spec.to_regex(), vocabulary.inner, json_text=spec.is_json)
    full = TransitionTable.from_index(index)
    texts = forced_texts(full, vocabulary.token_bytes)
    return full, narrow_forced_runs(full, vocabulary.token_bytes, texts, vocabulary.encoder())


def _walk(t: TransitionTable, tokens: list[int]) -> list[int] | None:
    """The states a token sequence passes through, or None where one is not allowed."""
    states = [t.initial_state]
    for token in tokens:
        if (state := t.next_state(states[-1], token)) is None:
            return None
        states.append(state)
    return states


@pytest.mark.parametrize("separators", [(", ", ": "), (",", ":")])
def test_keys_and_braces_allow_the_tokenizers_token_alone(tokenizer, vocabulary, separators):
    full, narrow = _both(ConstraintSpec.json_schema(SCHEMA), vocabulary)
    ids = tokenizer.encode(json.dumps(DOCUMENT, separators=separators),
                           add_special_tokens=False)
    states = _walk(narrow, ids)
    assert states is not None and narrow.finals[states[-1]]
    alone = {tokenizer.decode([token]) for state, token in zip(states, ids, strict=False)
             if len(narrow.tokens_from(state)) == 1}
    # `{"`, not `{` then `"`; each key's word; the rest is the model's to choose.
    assert {'{"', "name", "description", "size", "count"} <= alone
    assert len(full.tokens_from(full.initial_state)) > 1  # `{`, `{"`, `{"n`... before
    assert [tokenizer.decode([t]) for t in narrow.tokens_from(narrow.initial_state)] == ['{"']


def test_a_narrowed_state_keeps_a_token_of_every_continuation(tokenizer, vocabulary):
    full, narrow = _both(ConstraintSpec.json_schema(SCHEMA), vocabulary)
    texts = forced_texts(full, vocabulary.token_bytes)
    narrowed = [s for s in range(full.num_states)
                if len(narrow.tokens_from(s)) < len(full.tokens_from(s))]
    assert narrowed
    for state in narrowed:
        (token,) = {vocabulary.token_bytes[t] for t in narrow.tokens_from(state)}
        assert texts[state].startswith(token) and len(token) < len(texts[state])
        # Where it leads is where outlines-core's index led: the same text goes on.
        for kept in narrow.tokens_from(state):
            assert narrow.next_state(state, kept) == full.next_state(state, kept)


def test_random_walks_end_in_valid_documents(vocabulary, tokenizer):
    import jsonschema

    compiled = CompiledIndex.for_spec(ConstraintSpec.json_schema(SCHEMA), vocabulary)
    rng = random.Random(0)
    t = compiled.transitions
    for _ in range(20):
        state, tokens = t.initial_state, []
        while not t.finals[state] and len(tokens) < 200:
            token = int(rng.choice(t.tokens_from(state)))
            tokens.append(token)
            state = t.next_state(state, token)
        if t.finals[state]:
            jsonschema.validate(json.loads(tokenizer.decode(tokens)), SCHEMA)


def test_real_documents_as_the_tokenizer_writes_them_stay_allowed(tokenizer, vocabulary):
    from bench.jsonschemabench import DATA_DIR, in_schema_order, load

    if not DATA_DIR.is_dir():
        pytest.skip("../shared/data not present")
    checked = narrowed_states = 0
    for case in load("Glaiveai2K", sample=12, seed=3):
        spec = ConstraintSpec.json_schema(case.schema)
        if spec.outlines_refusal():
            continue
        full, narrow = _both(spec, vocabulary)
        narrowed_states += int((full.offsets[1:] - full.offsets[:-1] >
                                narrow.offsets[1:] - narrow.offsets[:-1]).sum())
        for test in case.tests:
            if test["valid"]:
                text = json.dumps(in_schema_order(test["data"], case.schema),
                                  ensure_ascii=False)
                ids = tokenizer.encode(text, add_special_tokens=False)
                if _walk(full, ids) is not None:
                    assert _walk(narrow, ids) is not None, (case.id, text)
                    checked += 1
    assert checked >= 5 and narrowed_states > 0, (checked, narrowed_states)


def test_a_tokenizer_that_rewrites_text_narrows_nothing(tokenizer, vocabulary):
    spec = json.loads(vocabulary.tokenizer_json)
    spec["pre_tokenizer"]["pretokenizers"][-1]["add_prefix_space"] = True  # `Ġ{"`
    encoder = CanonicalEncoder(json.dumps(spec))
    assert not encoder.writes_bytes_back(vocabulary.token_bytes)
    assert CanonicalEncoder(vocabulary.tokenizer_json).writes_bytes_back(vocabulary.token_bytes)


def test_only_byte_level_tokenizers_carry_their_splits(tokenizer, vocabulary):
    assert vocabulary.encoder() is not None
    other = Vocabulary(vocabulary.inner, vocabulary.eos_token_id, vocabulary.size,
                       "no-tokenizer", vocabulary.token_bytes)
    assert other.encoder() is None


def test_drafts_of_a_key_are_forced_alone_up_to_its_last_piece(tokenizer, vocabulary):
    from dotllm.guide import Guide

    compiled = CompiledIndex.for_spec(ConstraintSpec.json_schema(SCHEMA), vocabulary)
    guide = Guide(compiled, vocabulary.eos_token_id)
    drafts = guide.forced_tokens(16)
    assert [tokenizer.decode([t]) for t in drafts] == ['{"', "name", '":']
    # `{"` and `name` are their states' only choice; `":` may also be `":"` or `": "`.
    assert guide.forced_alone(drafts) == 2
    assert guide.forced_alone(drafts[1:]) == 0  # from the start, `name` is no choice at all
    assert guide.state == compiled.initial_state  # counting does not move the guide
