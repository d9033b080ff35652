"""Tiers: llguidance while the index compiles, the index from the next step boundary."""

from __future__ import annotations

from concurrent.futures import Future

import llguidance
import numpy as np
import pytest

from dotllm.compiler import llguidance_grammar
from dotllm.compiler.compiled import CompiledIndex
from dotllm.compiler.mask_table import words_for
from dotllm.compiler.pool import CompileFailed
from dotllm.compiler.spec import ConstraintSpec
from dotllm.guide import Guide
from dotllm.llguidance_guide import LLGuidanceGuide
from dotllm.tiers import TieredGuide
from dotllm.vllm_ext.backend import llguidance_tokenizer

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "n": {"type": "integer"}},
          "required": ["name", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def spec():
    return ConstraintSpec.json_schema(SCHEMA)


@pytest.fixture(scope="module")
def compiled(spec, vocabulary):
    return CompiledIndex.for_spec(spec, vocabulary)


@pytest.fixture(scope="module")
def ll_tokenizer(tokenizer, vocabulary):
    return llguidance_tokenizer(tokenizer, vocabulary.size)


@pytest.fixture
def tiered(spec, ll_tokenizer, vocabulary):
    def llguidance_guide():
        matcher = llguidance.LLMatcher(ll_tokenizer, llguidance_grammar.grammar_for(spec))
        return LLGuidanceGuide(matcher, vocabulary.eos_token_id)

    def make(index: Future):
        outcomes = []
        guide = TieredGuide(llguidance_guide(), index, vocabulary.eos_token_id,
                            outcomes.append, llguidance_guide)
        return guide, outcomes
    return make


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_switches_to_the_index_mid_document_with_the_same_masks(
        tiered, compiled, tokenizer, vocabulary):
    index: Future = Future()
    guide, outcomes = tiered(index)
    assert guide.accept_tokens(encode(tokenizer, '{"name": "Ad'))
    assert guide.tier == "llguidance"
    index.set_result(compiled)  # the pool finished
    assert guide.accept_tokens(encode(tokenizer, 'a", "n": 4'))
    assert guide.tier == "index" and outcomes == ["switched"]
    # The index's mask here is what a request that started on the index would get.
    direct = Guide(compiled, vocabulary.eos_token_id)
    assert direct.accept_tokens(encode(tokenizer, '{"name": "Ada", "n": 4'))
    got, want = (np.zeros(words_for(vocabulary.size), dtype=np.int32) for _ in range(2))
    guide.fill_row(got)
    direct.fill_row(want)
    assert np.array_equal(got, want)
    assert guide.accept_tokens(encode(tokenizer, "2}") + [vocabulary.eos_token_id])
    assert guide.is_terminated()


def test_rollback_before_the_switch_is_not_replayed(tiered, compiled, tokenizer):
    index: Future = Future()
    guide, outcomes = tiered(index)
    assert guide.accept_tokens(encode(tokenizer, '{"name": "Bob'))
    draft = encode(tokenizer, '", "n"')
    assert guide.accept_tokens(draft)
    guide.rollback(len(draft))  # a rejected speculative draft
    index.set_result(compiled)
    assert guide.accept_tokens(encode(tokenizer, '", "n": 1}'))
    assert outcomes == ["switched"]


def test_an_index_that_disagrees_leaves_the_request_on_llguidance(
        tiered, tokenizer, vocabulary):
    other = CompiledIndex.build("[0-9]+", vocabulary)
    index: Future = Future()
    guide, outcomes = tiered(index)
    assert guide.accept_tokens(encode(tokenizer, '{"name'))
    index.set_result(other)
    assert guide.accept_tokens(encode(tokenizer, '": "x'))
    assert guide.tier == "llguidance" and outcomes == ["mismatch"]


def test_a_failed_compile_leaves_the_request_on_llguidance(tiered, tokenizer):
    index: Future = Future()
    guide, outcomes = tiered(index)
    index.set_exception(CompileFailed("took longer than 60 s", "timeout"))
    assert guide.accept_tokens(encode(tokenizer, '{"name": "x", "n": 1}'))
    assert guide.tier == "llguidance" and outcomes == ["timeout"]


def test_an_index_ready_by_the_first_step_serves_it(tiered, compiled, vocabulary):
    """Compiled while the prompt prefilled: the first row is the index's, no llguidance."""
    index: Future = Future()
    guide, outcomes = tiered(index)
    index.set_result(compiled)
    table, row = guide.table_row()
    assert table is compiled.table and guide.tier == "index" and outcomes == ["switched"]
    assert np.array_equal(table.rows[row], compiled.mask_row(compiled.initial_state))


def test_an_index_that_arrives_between_steps_serves_the_next_row(
        tiered, compiled, tokenizer, vocabulary):
    index: Future = Future()
    guide, outcomes = tiered(index)
    assert guide.table_row() is None  # llguidance's row: computed
    assert guide.accept_tokens(encode(tokenizer, '{"name": "Al'))
    index.set_result(compiled)
    got, want = (np.zeros(words_for(vocabulary.size), dtype=np.int32) for _ in range(2))
    guide.fill_row(got)
    assert guide.tier == "index" and outcomes == ["switched"]
    direct = Guide(compiled, vocabulary.eos_token_id)
    assert direct.accept_tokens(encode(tokenizer, '{"name": "Al'))
    direct.fill_row(want)
    assert np.array_equal(got, want)
