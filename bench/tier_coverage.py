"""Coverage and correctness of DotLLM's tiers on JSONSchemaBench subsets, against each
engine alone.

    python -m bench.tier_coverage [--sample N] [--timeout S] [--workers W] [--subsets ...]

outlines-core alone serves what compiles (`bench.compile_coverage`); llguidance alone,
what it builds a matcher for; the tiers serve what `DotllmBackend.compile_spec` returns a
guide for once the compiles are over (a request that came earlier started on llguidance,
or waited for the index where llguidance could not serve it). Each served schema's guide
is checked against the schema's instances: an invalid instance may only be accepted for
a `format` violation, which JSON Schema treats as an annotation, or for matching several
`oneOf` branches: outlines-core (like xgrammar) reads `oneOf` as `anyOf` (llguidance
refuses a `oneOf` whose branches it cannot tell apart).
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import jsonschema
import llguidance

from bench import compile_coverage
from bench.jsonschemabench import Case, accepts, in_schema_order, load, parser
from dotllm.compiler import llguidance_grammar
from dotllm.compiler.spec import ConstraintError, ConstraintSpec
from dotllm.llguidance_guide import LLGuidanceGuide
from dotllm.tiers import IndexWithFallback, TieredGuide

_TIERS = {IndexWithFallback: "index", LLGuidanceGuide: "llguidance", TieredGuide: "tiered"}


@dataclass
class TierOutcome:
    case: Case
    outlines: bool  # outlines-core alone compiles it
    llguidance: bool  # llguidance alone serves it
    tier: str | None  # what serves it: index | llguidance | tiered (llguidance, then the
    # index once its compile ends: here, a compile outlines-core alone did not finish) |
    # None (a 400)
    reason: str = ""  # the 400's message
    valid_accepted: int = 0
    valid_total: int = 0
    unsound: list[str] = field(default_factory=list)  # invalid instances accepted
    one_of_overlaps: list[str] = field(default_factory=list)  # invalid only by oneOf's "one"


def llguidance_alone(backend, spec: ConstraintSpec) -> bool:
    try:
        grammar = llguidance_grammar.grammar_for(spec)
    except ConstraintError:
        return False
    return not llguidance.LLMatcher(backend._ll_tokenizer, grammar).is_error()


def _fresh(backend, spec: ConstraintSpec):
    return backend.compile_spec(spec).guide


def run(cases: list[Case], backend, tokenizer, workers: int, timeout: float,
        cache_dir: Path) -> list[TierOutcome]:
    """`backend` must read its index cache from `cache_dir`: outlines-core's compiles,
    run first, fill it."""
    compiled = {o.case.id: o.status == "compiled" for o in compile_coverage.run(
        cases, tokenizer, backend.vocabulary, workers, timeout, cache_dir)}
    outcomes = []
    for case in cases:
        spec = ConstraintSpec.json_schema(case.schema)
        outcome = TierOutcome(case, compiled[case.id], llguidance_alone(backend, spec), None)
        outcomes.append(outcome)
        try:
            guide = _fresh(backend, spec)
        except ConstraintError as e:
            outcome.reason = str(e)
            continue
        outcome.tier = _TIERS[type(guide)]
        for test in case.tests:
            text = json.dumps(in_schema_order(test["data"], case.schema), ensure_ascii=False)
            ok = accepts(partial(_fresh, backend, spec), tokenizer, text)
            if test["valid"]:
                outcome.valid_total += 1
                outcome.valid_accepted += ok
            elif ok and not _valid(test["data"], case.schema):
                target = outcome.unsound
                if _valid(test["data"], one_of_as_any_of(case.schema)):
                    target = outcome.one_of_overlaps
                target.append(text)
    return outcomes


def _valid(value, schema) -> bool:
    try:
        jsonschema.validate(value, schema)  # no format checker: formats are annotations
        return True
    except (jsonschema.ValidationError, jsonschema.SchemaError):
        return False


def one_of_as_any_of(schema):
    """How outlines-core (and xgrammar) read `oneOf`: a value matching several branches is
    not refused."""
    if isinstance(schema, list):
        return [one_of_as_any_of(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    return {"anyOf" if k == "oneOf" else k: v if k in ("enum", "const") else
            one_of_as_any_of(v) for k, v in schema.items()}


def report(subset: str, outcomes: list[TierOutcome]) -> dict:
    served = [o for o in outcomes if o.tier]
    return {
        "subset": subset, "schemas": len(outcomes),
        "outlines_alone": sum(o.outlines for o in outcomes),
        "llguidance_alone": sum(o.llguidance for o in outcomes),
        "tiers": len(served), **Counter(f"tiers_{o.tier}" for o in served),
        "valid_accepted": f"{sum(o.valid_accepted for o in served)}/"
                          f"{sum(o.valid_total for o in served)}",
        "unsound": sum(len(o.unsound) for o in served),
        "oneOf_overlaps_accepted": sum(len(o.one_of_overlaps) for o in served),
    }


def main(argv: list[str] | None = None) -> int:
    from bench.jsonschemabench import embedded_tokenizer_and_vocabulary
    from dotllm.settings import Settings
    from dotllm.vllm_ext.backend import DotllmBackend

    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    tokenizer, vocabulary = embedded_tokenizer_and_vocabulary()
    with tempfile.TemporaryDirectory() as tmp:
        backend = DotllmBackend(None, tokenizer=tokenizer, vocab_size=vocabulary.size,
                                settings=Settings(compile_workers=args.workers,
                                                  compile_timeout=args.timeout,
                                                  index_cache_dir=tmp))
        for subset in args.subsets:
            outcomes = run(load(subset, sample=args.sample or None), backend, tokenizer,
                           args.workers, args.timeout, Path(tmp))
            print(json.dumps(report(subset, outcomes)), flush=True)
            for o in outcomes:
                if o.tier is None or o.unsound:
                    print(f"  {o.case.id}: {o.tier} {o.reason[:200]} {o.unsound[:1]}")
        backend.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
