"""Per-request state on llguidance; the contract it shares with `Guide` (EOS, masks) is
tested on both in tests/test_guide.py."""

from __future__ import annotations

import json

import llguidance
import numpy as np
import pytest

from dotllm.compiler import llguidance_grammar
from dotllm.compiler.spec import ConstraintSpec
from dotllm.llguidance_guide import LLGuidanceGuide, fill_rows_in_parallel
from dotllm.vllm_ext.backend import llguidance_tokenizer


@pytest.fixture(scope="module")
def ll_tokenizer(tokenizer, vocabulary):
    return llguidance_tokenizer(tokenizer, vocabulary.size)


@pytest.fixture
def make(ll_tokenizer, vocabulary):
    def make(spec: ConstraintSpec) -> LLGuidanceGuide:
        grammar = llguidance_grammar.grammar_for(spec)
        return LLGuidanceGuide(llguidance.LLMatcher(ll_tokenizer, grammar),
                               vocabulary.eos_token_id)
    return make


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_keywords_outlines_core_skips_are_enforced(make, tokenizer, vocabulary):
    guide = make(ConstraintSpec.json_schema({"type": "integer", "minimum": 10, "maximum": 20}))
    assert not guide.accept_tokens(encode(tokenizer, "21"))
    assert guide.accept_tokens(encode(tokenizer, "15"))
    assert guide.accept_tokens([vocabulary.eos_token_id])
    assert guide.is_terminated()


def test_all_or_nothing_validate_and_rollback(make, tokenizer, vocabulary):
    guide = make(ConstraintSpec.grammar('start: "x" ("y" | "z")+'))
    good, bad = encode(tokenizer, "xy"), encode(tokenizer, "q")
    assert guide.validate_tokens(good + bad) == good
    assert not guide.accept_tokens(good + bad)  # nothing consumed
    assert guide.accept_tokens(good)
    assert guide.accept_tokens([vocabulary.eos_token_id])
    guide.rollback(1 + len(good))  # undo EOS and "xy"
    assert not guide.is_terminated()
    assert guide.validate_tokens(good) == good


def test_eos_after_the_matcher_stopped_by_itself_rolls_back(make, tokenizer, vocabulary):
    guide = make(ConstraintSpec.choice(["yes"]))
    yes = encode(tokenizer, "yes")
    assert guide.accept_tokens(yes)
    assert guide.validate_tokens([vocabulary.eos_token_id]) == [vocabulary.eos_token_id]
    assert guide.accept_tokens([vocabulary.eos_token_id]) and guide.is_terminated()
    guide.rollback(2)
    assert not guide.is_terminated()
    guide.reset()
    assert guide.accept_tokens(yes)
    guide.reset()  # the stop and EOS in one step (speculative tokens)
    assert guide.validate_tokens(yes + [vocabulary.eos_token_id]) == yes + [
        vocabulary.eos_token_id]
    assert guide.accept_tokens(yes + [vocabulary.eos_token_id]) and guide.is_terminated()
    guide.rollback(1 + len(yes))
    assert guide.accept_tokens(yes)


@pytest.mark.parametrize("whitespace", [None, ""])
def test_llguidance_json_lies_within_the_index_language(make, tokenizer, vocabulary,
                                                        whitespace):
    """What llguidance lets through, outlines-core's regex allows: tiers can hand over."""
    from dotllm.compiler.compiled import CompiledIndex
    from dotllm.guide import Guide

    schema = {"type": "object", "properties": {"a": {"type": "boolean"},
                                               "b": {"type": "integer"}},
              "required": ["a", "b"], "additionalProperties": False}
    spec = ConstraintSpec.json_schema(schema, whitespace_pattern=whitespace)
    index = Guide(CompiledIndex.for_spec(spec, vocabulary), vocabulary.eos_token_id)
    canonical = '{"a": true, "b": 12}' if whitespace is None else '{"a":true,"b":12}'
    for text, llguidance_allows in [(canonical, True), ('{"a":  true, "b": 12}', False)]:
        guide = make(spec)
        ids = encode(tokenizer, text)
        assert guide.accept_tokens(ids) is llguidance_allows, text
        if llguidance_allows:
            assert index.accept_tokens(ids), text


def test_objects_are_closed_as_outlines_core_closes_them():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "string"}}, "additionalProperties": True},
        "properties": {"type": "string"}},  # a property of that name
        "enum": [{"properties": 1}], "$defs": {"x": {"properties": {}}}}
    closed = llguidance_grammar.for_llguidance(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["$defs"]["x"]  # may be an allOf branch
    assert closed["enum"] == [{"properties": 1}]  # data, not a schema
    assert closed["properties"]["properties"] == {"type": "string"}
    assert "additionalProperties" not in closed["properties"]
    assert "additionalProperties" not in schema  # the request's schema is left alone


def test_required_names_are_declared_before_objects_are_closed():
    """JSON Schema: a required name `properties` does not declare must be present, with
    any value `additionalProperties` allows; closing the object must not forbid it."""
    closed = llguidance_grammar.for_llguidance(
        {"type": "object", "properties": {}, "required": ["top"]})
    assert closed["properties"] == {"top": {}} and closed["additionalProperties"] is False
    typed = llguidance_grammar.for_llguidance({"properties": {"a": {}}, "required": ["b"],
                                               "additionalProperties": {"type": "integer"}})
    assert typed["properties"]["b"] == {"type": "integer"}


def test_patterns_and_formats_are_read_as_json_schema_means_them():
    prepared = llguidance_grammar.for_llguidance({"type": "object", "properties": {
        "code": {"type": "string", "pattern": r"^\d{3}$"},
        "day": {"type": "string", "format": "date"}},
        "patternProperties": {r"^\w+$": {}}})
    assert prepared["properties"]["code"]["pattern"] == "^[0-9]{3}$"
    assert prepared["properties"]["day"]["pattern"].startswith("^(?:(?:[0-9]{3}[1-9]")
    assert "format" not in prepared["properties"]["day"]
    assert list(prepared["patternProperties"]) == ["^(?:[0-9A-Z_a-z]+)$"]


def test_a_steps_masks_in_one_parallel_call_are_each_guides_own(make, tokenizer, vocabulary):
    """Guides of several constraints, each at a state of its own (random walks), their
    masks written at shuffled rows of one array in one call: each row is what the guide
    writes alone, and rows no guide names are left as they were."""
    rng = np.random.default_rng(0)
    specs = [ConstraintSpec.json_schema({"type": "object", "properties": {
                 "name": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}},
                 "required": ["name", "n"]}),
             ConstraintSpec.grammar('start: "x" ("y" | "z")+'),
             ConstraintSpec.regex("[a-c]{3,9}"),
             ConstraintSpec.choice(["alpha", "beta", "gamma"])]
    words = (vocabulary.size + 31) // 32
    guides = []
    for i in range(24):
        guide = make(specs[i % len(specs)])
        for _ in range(int(rng.integers(0, 6))):  # walk: a token its own mask allows
            row = np.zeros(words, dtype=np.int32)
            guide.fill_row(row)
            allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))
            allowed = allowed[allowed != vocabulary.eos_token_id]
            if not len(allowed):
                break
            assert guide.accept_tokens([int(rng.choice(allowed))])
        guides.append(guide)
    rows = np.full((40, words), 7, dtype=np.int32)
    targets = [int(t) for t in rng.permutation(40)[:len(guides)]]
    pairs = list(zip(guides, targets, strict=True))
    fill_rows_in_parallel([(g.matcher_for_mask(), t) for g, t in pairs], rows)
    for guide, t in pairs:
        alone = np.zeros(words, dtype=np.int32)
        guide.fill_row(alone)
        assert np.array_equal(rows[t], alone)
    untouched = np.setdiff1d(np.arange(40), targets)
    assert (rows[untouched] == 7).all()
    one = np.zeros((1, words), dtype=np.int32)  # a lone matcher takes the direct path
    fill_rows_in_parallel([(guides[0].matcher_for_mask(), 0)], one)
    alone = np.zeros(words, dtype=np.int32)
    guides[0].fill_row(alone)
    assert np.array_equal(one[0], alone)


def test_its_fast_forward_tokens_are_each_its_masks_only_token(make, tokenizer, vocabulary):
    """`forced_alone` counts every fast-forward token as its state's only choice
    (`dotllm_forced_tokens_total{tier="llguidance"}`): at each token of real documents as
    the tokenizer writes them, each fast-forward token is the one its mask allows."""
    from bench.jsonschemabench import DATA_DIR, in_schema_order, load

    if not DATA_DIR.is_dir():
        pytest.skip("../shared/data not present")
    words = (vocabulary.size + 31) // 32
    drafted = 0
    for case in load("Glaiveai2K", sample=6, seed=3):
        document = next((t["data"] for t in case.tests if t["valid"]), None)
        if document is None:
            continue
        text = json.dumps(in_schema_order(document, case.schema), ensure_ascii=False)
        guide = make(ConstraintSpec.json_schema(case.schema))
        for token in [*encode(tokenizer, text), None]:
            drafts = guide.forced_tokens(16)
            for draft in drafts:
                row = np.zeros(words, dtype=np.int32)
                guide.fill_row(row)
                allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))
                assert allowed.tolist() == [draft], (case.id, text, tokenizer.decode(drafts))
                assert guide.accept_tokens([draft])
            guide.rollback(len(drafts))
            assert guide.forced_alone(drafts) == len(drafts)
            drafted += len(drafts)
            if token is None or not guide.accept_tokens([token]):
                break
    assert drafted >= 100, drafted
