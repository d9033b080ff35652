"""Real-world schemas (../shared/data): each compiles or is refused with a clear reason,
nothing crashes, and compiled indexes accept valid instances and reject invalid ones.

CI compiles a fixed sample per subset with a short timeout (`python -m
bench.compile_coverage --sample 0` runs them all); coverage and compile-time percentiles
are printed (`pytest -s`, or in the summary with -rA).
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from bench import tier_coverage
from bench.compile_coverage import report, run
from bench.jsonschemabench import DATA_DIR, SUBSETS, in_schema_order, load

SAMPLE = 8
TIMEOUT_S = 10.0

pytestmark = pytest.mark.skipif(not DATA_DIR.is_dir(), reason="../shared/data not present")


def test_every_schema_compiles_or_is_refused_clearly(tokenizer, vocabulary, tmp_path):
    outcomes = []
    for subset in SUBSETS:
        subset_outcomes = run(load(subset, sample=SAMPLE), tokenizer, vocabulary, workers=2,
                              timeout=TIMEOUT_S, cache_dir=tmp_path / subset)
        print(json.dumps(report(subset, subset_outcomes)))
        assert len(subset_outcomes) == SAMPLE
        outcomes += subset_outcomes
    for o in outcomes:
        assert o.status in ("compiled", "refused", "timeout", "too_large", "invalid"), o
        if o.status != "compiled":
            assert o.reason and len(o.reason) < 2000, o
    compiled = [o for o in outcomes if o.status == "compiled"]
    assert compiled, "no schema of the sample compiled"

    # Soundness: an accepted invalid instance may only break a `format` (date-time
    # without a time zone, February 30th), which JSON Schema treats as an annotation.
    for o in compiled:
        for text in o.invalid_accepted:
            jsonschema.validate(json.loads(text), o.case.schema)  # valid once formats aside

    # Completeness: object keys come in schema order and one optional space is allowed,
    # which is how the tests write valid instances, so most are accepted; not those with
    # properties the schema allows but does not declare (outlines-core never adds any).
    valid = sum(o.valid_total for o in compiled)
    accepted = sum(o.valid_accepted for o in compiled)
    assert accepted >= 0.75 * valid, (accepted, valid)


def test_tiers_serve_at_least_what_either_engine_serves(backend, tokenizer):
    """Every schema is served (by the index, llguidance, or llguidance then the index) or
    refused with both engines' reasons; what is served accepts no invalid instance (but
    for formats, and oneOf overlaps: outlines-core reads oneOf as anyOf)."""
    cache_dir = backend.settings.disk_dir(None)
    outcomes = []
    for subset in SUBSETS:
        subset_outcomes = tier_coverage.run(load(subset, sample=SAMPLE, seed=1), backend,
                                            tokenizer, 2, TIMEOUT_S, cache_dir)
        print(json.dumps(tier_coverage.report(subset, subset_outcomes)))
        outcomes += subset_outcomes
    for o in outcomes:
        assert o.tier or not (o.outlines or o.llguidance), o.case.id
        assert o.tier or ("; llguidance cannot either" in o.reason and len(o.reason) < 2000)
        assert not o.unsound, (o.case.id, o.unsound)
        if o.tier == "index":
            assert o.outlines
    served = sum(o.tier is not None for o in outcomes)
    assert served >= max(sum(o.outlines for o in outcomes), sum(o.llguidance for o in outcomes))
    assert {o.tier for o in outcomes} >= {"index", "llguidance"}
    valid = sum(o.valid_total for o in outcomes if o.tier)
    assert sum(o.valid_accepted for o in outcomes if o.tier) >= 0.75 * valid


def test_instances_are_written_in_schema_order():
    schema = {"properties": {"b": {"properties": {"y": {}, "x": {}}}, "a": {}}}
    value = {"a": 1, "b": {"x": 1, "y": 2}, "z": 0}
    assert list(in_schema_order(value, schema)) == ["b", "a", "z"]
    assert list(in_schema_order(value, schema)["b"]) == ["y", "x"]


def test_schema_order_follows_refs_and_branches():
    schema = {
        "$defs": {"item": {"anyOf": [{"properties": {"q": {}, "p": {}}},
                                     {"properties": {"n": {}, "m": {}}}]}},
        "type": "array", "items": {"$ref": "#/$defs/item"},
    }
    value = [{"p": 1, "q": 2}, {"m": 1, "n": 2}]
    assert [list(v) for v in in_schema_order(value, schema)] == [["q", "p"], ["n", "m"]]
