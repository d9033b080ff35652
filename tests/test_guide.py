"""Per-request state: accept, validate, roll back, EOS, and filling a bitmask row.

The contract tests run on both engines a request can be guided by: an outlines-core index
(`Guide`) and an llguidance matcher (`LLGuidanceGuide`, more in test_llguidance_guide.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from dotllm.compiler.compiled import CompiledIndex
from dotllm.compiler.mask_table import words_for
from dotllm.compiler.spec import ConstraintSpec
from dotllm.guide import Guide

PERSON = ConstraintSpec.json_schema(
    {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
    whitespace_pattern="")


@pytest.fixture(scope="module")
def person(vocabulary):
    return CompiledIndex.for_spec(PERSON, vocabulary)


@pytest.fixture(params=["index", "llguidance"])
def person_guide(request, person, tokenizer, vocabulary):
    if request.param == "index":
        return Guide(person, vocabulary.eos_token_id)
    import llguidance

    from dotllm.compiler import llguidance_grammar
    from dotllm.llguidance_guide import LLGuidanceGuide
    from dotllm.vllm_ext.backend import llguidance_tokenizer

    matcher = llguidance.LLMatcher(llguidance_tokenizer(tokenizer, vocabulary.size),
                                   llguidance_grammar.grammar_for(PERSON))
    return LLGuidanceGuide(matcher, vocabulary.eos_token_id)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def allowed(row: np.ndarray, token: int) -> bool:
    return bool((int(row[token >> 5]) >> (token & 31)) & 1)


def test_accepts_a_valid_document_then_eos(person_guide, tokenizer, vocabulary):
    guide = person_guide
    ids = encode(tokenizer, '{"n":42}')
    assert guide.accept_tokens(ids)
    assert not guide.is_terminated()
    assert guide.accept_tokens([vocabulary.eos_token_id])
    assert guide.is_terminated()
    assert not guide.accept_tokens([ids[0]])  # nothing after EOS


def test_eos_is_rejected_before_the_document_is_complete(person_guide, tokenizer, vocabulary):
    guide = person_guide
    assert guide.accept_tokens(encode(tokenizer, '{"n":4'))
    row = np.zeros(words_for(vocabulary.size), dtype=np.int32)
    guide.fill_row(row)
    assert not allowed(row, vocabulary.eos_token_id)
    assert not guide.accept_tokens([vocabulary.eos_token_id])
    assert guide.accept_tokens(encode(tokenizer, "2}"))
    guide.fill_row(row)
    assert allowed(row, vocabulary.eos_token_id)


def test_rejected_tokens_leave_the_state_unchanged(person, tokenizer, vocabulary):
    guide = Guide(person, vocabulary.eos_token_id)
    good = encode(tokenizer, '{"n":')
    assert guide.accept_tokens(good)
    state = guide.state
    assert not guide.accept_tokens(encode(tokenizer, "1") + encode(tokenizer, "x"))
    assert guide.state == state and guide.num_accepted == len(good)


def test_validate_returns_the_accepted_prefix_without_moving(person, tokenizer, vocabulary):
    guide = Guide(person, vocabulary.eos_token_id)
    ids = encode(tokenizer, '{"n":7}')
    bad = encode(tokenizer, "x")
    assert guide.validate_tokens(ids + bad) == ids
    assert guide.validate_tokens(ids + [vocabulary.eos_token_id] + bad) == [
        *ids, vocabulary.eos_token_id]
    assert guide.num_accepted == 0


def test_rollback_restores_earlier_states_and_undoes_eos(person, tokenizer, vocabulary):
    guide = Guide(person, vocabulary.eos_token_id)
    ids = encode(tokenizer, '{"n":7}')
    guide.accept_tokens(ids[:2])
    mid = guide.state
    guide.accept_tokens([*ids[2:], vocabulary.eos_token_id])
    assert guide.is_terminated()
    guide.rollback(1)
    assert not guide.is_terminated()
    guide.rollback(len(ids) - 2)
    assert guide.state == mid
    guide.rollback(100)
    assert guide.num_accepted == 0
    guide.accept_tokens(ids)
    guide.reset()
    assert guide.num_accepted == 0 and not guide.is_terminated()


def test_fill_row_allows_exactly_the_valid_next_tokens(person, tokenizer, vocabulary):
    guide = Guide(person, vocabulary.eos_token_id)
    row = np.zeros(words_for(vocabulary.size), dtype=np.int32)
    guide.fill_row(row)
    # `{"n":` is forced: the one token the tokenizer starts it with (`{"`), not `{` alone
    # (canonical forced runs, test_canonical.py).
    start, brace = encode(tokenizer, '{"n":1}')[0], encode(tokenizer, "{")[0]
    letter = encode(tokenizer, "a")[0]
    assert allowed(row, start) and not allowed(row, brace) and not allowed(row, letter)
    assert not allowed(row, vocabulary.eos_token_id)
    allowed_ids = [t for t in range(vocabulary.size) if allowed(row, t)]
    assert allowed_ids and all(guide.validate_tokens([t]) == [t] for t in allowed_ids)


def test_fill_row_after_eos_allows_everything(person, tokenizer, vocabulary):
    guide = Guide(person, vocabulary.eos_token_id)
    guide.accept_tokens([*encode(tokenizer, '{"n":1}'), vocabulary.eos_token_id])
    row = np.zeros(words_for(vocabulary.size), dtype=np.int32)
    guide.fill_row(row)
    assert (row == -1).all()


def test_fill_row_pads_a_wider_logits_row(person, vocabulary):
    guide = Guide(person, vocabulary.eos_token_id)
    row = np.full(words_for(vocabulary.size) + 4, -1, dtype=np.int32)
    guide.fill_row(row)
    assert (row[-4:] == 0).all()
