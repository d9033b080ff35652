"""Soundness by generation, CI-sized: random walks through each tier (the index,
llguidance, and llguidance handed over to the index mid-document) on schemas that broke
before and on a sample of ../shared/data; every ended document must validate against the
schema served. `python -m bench.soundness --sample 0` runs all of ../shared/data.
"""

from __future__ import annotations

import json

import pytest

from bench import soundness
from bench.jsonschemabench import DATA_DIR, SUBSETS, Case, load
from bench.soundness import TIERS, Walker, failures, fuzz_schema, pattern_witnesses, report
from dotllm.compiler.relaxation import serve
from dotllm.compiler.spec import ConstraintSpec
from tests.test_outlines_schema import WORDS

WALKS = 8

# Each broke a tier once: the output did not validate, or the index refused what
# llguidance had allowed when the request was handed over.
REGRESSIONS = {
    "allOf of two objects (was two documents glued)": {"allOf": [
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]},
    "oneOf of required names beside properties (was {})": {
        "type": "object", "additionalProperties": False,
        "properties": {"a": {"type": "boolean"}, "b": {"type": "boolean"}},
        "oneOf": [{"required": ["a"]}, {"required": ["b"]}]},
    "required name not declared (was {})": {
        "type": "object", "properties": {}, "required": ["top"],
        "additionalProperties": {"type": "boolean"}},
    "ECMA digits in a pattern (were any Unicode digit)": {
        "type": "object", "properties": {"code": {"type": "string", "pattern": r"^\d{3}-\w$"}},
        "required": ["code"]},
    "a pattern with . and a negated class (could close the string)": {
        "type": "object", "properties": {"p": {"type": "string", "pattern": "^a.[^b]$"}},
        "required": ["p"]},
    "formats (no time zone, Feb 31st, leap seconds)": {
        "type": "object", "required": ["d", "t", "dt", "u"], "properties": {
            "d": {"type": "string", "format": "date"},
            "t": {"type": "string", "format": "time"},
            "dt": {"type": "string", "format": "date-time"},
            "u": {"type": "string", "format": "uuid"}}},
    "a recursive tree": {
        "type": "object", "required": ["n"], "properties": {
            "n": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#"}}}},
    "numbers whose exponent llguidance writes unsigned (hand-over refused)": {
        "type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]},
    "oneOf told apart by a discriminator": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "a"}, "x": {"type": "integer"}},
         "required": ["kind", "x"]},
        {"type": "object", "properties": {"kind": {"const": "b"}}, "required": ["kind"]}]},
    "enum of objects": {"enum": [{"a": [1, 2]}, "x", None]},
    "a pattern met anywhere in its string (walks wrote past it, never ended)": {
        "type": "object", "properties": {"v": {"type": "string", "pattern": r"\d+\.\d+\.\d+"}},
        "required": ["v"]},
    "patterns a string must end with or contain a word of (walks never ended)": {
        "type": "object", "required": ["path", "type"], "properties": {
            "path": {"type": "string", "pattern": r"^file:.+\.geodatabase?$"},
            "type": {"type": "string", "pattern": "response"}}},
    "integer bounds as range regexes (negative, exclusive, fractional, nullable)": {
        "type": "object", "properties": {
            "t": {"type": "integer", "minimum": -40, "exclusiveMaximum": 120},
            "n": {"type": ["integer", "null"], "exclusiveMinimum": 0.5, "maximum": 9999},
            "d": {"type": "integer", "maximum": -7}, "u": {"type": "integer", "minimum": 50}},
        "required": ["t", "n", "d", "u"], "additionalProperties": False},
}
# Served by llguidance alone (outlines-core cannot enforce them).
LLGUIDANCE_ONLY = {
    "multipleOf in decimal": {
        "type": "object", "properties": {"price": {"type": "number", "multipleOf": 0.01}},
        "required": ["price"]},
    "patternProperties read as a search (a name need not match whole)": {
        "type": "object", "patternProperties": {".*": {"type": "number"}}},
    "patternProperties anchored, nothing else allowed": {
        "type": "object", "patternProperties": {"^x": {"type": "integer"}},
        "additionalProperties": False},
    "patternProperties with a long repeat (llguidance's lexer gave up, EOS was taken)": {
        "$schema": "http://json-schema.org/draft-04/schema#",
        "patternProperties": {"[A-Za-z0-9-_.:]{1,255}": {"type": "string", "format": "uri"}}},
    "patternProperties and nothing else (llguidance matched escaped names)": {
        "additionalProperties": False, "patternProperties": {"^[a-zA-Z]+://[^ \"]+$": {}}},
    "allOf beside properties, objects not closed alone": {
        "type": "object", "properties": {"n": {"type": "number", "minimum": 1}},
        "required": ["n"], "allOf": [{"properties": {"m": {"type": "boolean"}},
                                      "required": ["m"]}]},
}


@pytest.fixture(scope="module")
def walker(tokenizer, vocabulary) -> Walker:
    return Walker(tokenizer, vocabulary.size, seed=7)


def assert_sound(results) -> None:
    lines = failures([r.record() for r in results])
    assert not lines, "\n".join(lines)


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_schemas_that_broke_generate_only_valid_documents(backend, walker, name):
    result = fuzz_schema(Case("regression", name, REGRESSIONS[name]), backend, walker,
                         WALKS, index_timeout=60)
    assert set(result.tiers) == set(TIERS)
    assert all(t.served for t in result.tiers.values()), result.tiers
    assert_sound([result])
    assert all(t.ended >= WALKS for t in result.tiers.values()), result.tiers


@pytest.mark.parametrize("name", list(LLGUIDANCE_ONLY))
def test_what_only_llguidance_serves_generates_only_valid_documents(backend, walker, name):
    result = fuzz_schema(Case("regression", name, LLGUIDANCE_ONLY[name]), backend, walker,
                         WALKS, index_timeout=60)
    assert result.tiers["llguidance"].served and not result.tiers["index"].served
    assert_sound([result])
    assert result.tiers["llguidance"].ended >= WALKS


def test_a_pattern_past_llguidances_lexer_with_its_lengths_generates_without_them(
        backend, walker):
    """llguidance gave up a few characters into this string (its lengths beside the
    pattern); served without the lengths, named, it writes whole documents."""
    schema = {"type": "object", "properties": {"q": WORDS}, "required": ["q"]}
    result = fuzz_schema(Case("regression", "words", schema), backend, walker, WALKS,
                         index_timeout=15)
    assert result.unenforced == ["minLength at /properties/q", "maxLength at /properties/q"]
    assert result.tiers["llguidance"].ended >= WALKS
    assert_sound([result])


def test_walks_whose_shortest_document_is_past_the_budget_get_a_larger_one(backend, walker):
    """Github_easy o12622 asks for 600 objects (~9,000 tokens); here 40 items and a budget
    of 64 tokens."""
    schema = {"type": "array", "items": {"enum": ["abc", "de"]}, "minItems": 40}
    result = fuzz_schema(Case("regression", "long", schema), backend, walker, WALKS,
                         index_timeout=30, max_tokens=64)
    assert all(t.ended >= WALKS for t in result.tiers.values() if t.served), result.tiers
    assert result.tiers["llguidance"].served
    assert_sound([result])


@pytest.mark.parametrize("pattern, witness", [
    (r"^(.*?)\.alfred3?workflow$", b".alfredworkflow"), ("response", b"response"),
    (r"^[a-z](?:[a-z-]{0,60}[a-z])?$", b"a"), (r"^[^@]+@[^@]+$", b"x@x"),
    (r"^\d{3}-\w$", b"000-a"), ("(?=a)b", None), ('^"+$', None)])
def test_a_patterns_witness_is_a_short_string_it_matches(pattern, witness):
    schema = {"type": "array", "items": {"type": "string", "pattern": pattern}}
    assert pattern_witnesses(schema) == ((witness,) if witness else ())


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason="../shared/data not present")
def test_a_sample_of_real_schemas_generates_only_valid_documents(backend, walker):
    results = []
    for subset in SUBSETS:
        cases = load(subset, sample=3, seed=11)
        subset_results = [fuzz_schema(c, backend, walker, WALKS, index_timeout=30)
                          for c in cases]
        print(report(subset, [r.record() for r in subset_results], WALKS))
        results += subset_results
    assert_sound(results)
    assert sum(r.served for r in results) >= 10


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason="../shared/data not present")
def test_schemas_already_recorded_are_reported_not_run_again(tmp_path, monkeypatch, capsys):
    cases = load("Github_trivial", sample=2)
    tier = {"served": True, "reason": "", "walks": 21, "ended": 20, "invalid": 0,
            "refused": 0, "first_failure": ""}

    def record(case, ended=20):
        unenforced = serve(ConstraintSpec.json_schema(case.schema), strict=False).unenforced
        return json.dumps({
            "subset": case.subset, "id": case.id, "served": True, "reason": "",
            "unenforced": [str(u) for u in unenforced],
            "tiers": {t: {**tier, "ended": ended} for t in TIERS}, "valid_as_asked": 0,
            "xgrammar": True, "seconds": 1.0}) + "\n"

    def no_job(*_):
        raise AssertionError("a recorded schema was run again")
    monkeypatch.setattr(soundness, "_Job", no_job)
    records = tmp_path / "records.jsonl"
    records.write_text("".join(map(record, cases)))
    argv = ["--sample", "2", "--subsets", "Github_trivial", "--records", str(records)]
    soundness.main(argv)
    soundness.main([*argv, "--rerun"])  # they stand: nothing to run again
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")]
    for row in rows:
        del row["wall_s"]  # this run's, rounded: 0 or 1 s
    assert rows[0] == rows[1] and rows[0]["schemas"] == rows[0]["served"] == 2
    assert rows[0]["xgrammar_serves"] == 2 and rows[0]["index"]["ended"] == 40
    # A tier that ended too few walks is run again with --rerun, and only then.
    records.write_text(record(cases[0], ended=19) + record(cases[1]))
    soundness.main(argv)
    with pytest.raises(AssertionError, match="run again"):
        soundness.main([*argv, "--rerun"])
