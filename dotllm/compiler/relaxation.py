"""Which schema a JSON-schema request is served, and what of it is not enforced.

OpenAI's API refuses, under `"strict": true`, a schema it cannot enforce; DotLLM does the
same, naming each keyword and its JSON pointer. A request that is not strict (`strict`
false or absent, vLLM's `structured_outputs`, the legacy fields) is served with
everything else enforced, and its response says what was not (`dotllm.vllm_ext.
unenforced_report`), so that a schema with one `uniqueItems` still gets valid JSON of the
right shape instead of a 400. What is left out:

- what no engine enforces anywhere (`enforcement.NEVER`, formats DotLLM has no pattern
  for, regexes with look-arounds);
- what neither engine enforces where it stands: outlines-core's rewriting stops at a
  keyword (`outlines_schema.NotForOutlines`) that llguidance cannot take either (a `oneOf`
  whose branches may overlap is then read as `anyOf`, `minProperties` dropped, ...);
- the length bounds beside a pattern on which llguidance's lexer would give up
  mid-answer (`lexer_probe`), where outlines-core does not serve the schema.

Cheap enough for the API server: each round is one pass of the rewriting and one
llguidance grammar check, and there are at most `MAX_ROUNDS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dotllm.compiler import enforcement, lexer_probe, llguidance_grammar
from dotllm.compiler.enforcement import Unenforced
from dotllm.compiler.spec import ConstraintError, ConstraintSpec

MAX_ROUNDS = 16
# What may be left out where neither engine takes it, and still leave a schema that
# allows every document the original allows.
RELAXABLE = frozenset({
    "oneOf", "minProperties", "maxProperties", "unevaluatedProperties", "patternProperties",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
})


@dataclass
class Served:
    spec: ConstraintSpec
    unenforced: list[Unenforced] = field(default_factory=list)
    original: object = None  # the schema as asked, when `unenforced` is not empty


def serve(spec: ConstraintSpec, strict: bool) -> Served:
    """The spec to serve for a request's JSON-schema `spec` (ConstraintError: a 400)."""
    original = spec.schema
    found = enforcement.never_enforced(original)
    if found and strict:
        raise ConstraintError("strict JSON schema uses what DotLLM cannot enforce: "
                              f"{enforcement.listed(found)}", "strict")
    for _ in range(MAX_ROUNDS):
        candidate = spec if not found else spec.with_schema(
            enforcement.relax(original, found))
        candidate.check()
        refusal = candidate.outlines_refusal_error()
        if refusal is None:
            return Served(candidate, found, original if found else None)
        if limits := lexer_probe.beyond_lexer(candidate.schema):
            if strict:
                raise ConstraintError(f"strict JSON schema: {candidate.outlines_refusal()}; "
                                      f"llguidance cannot either: {limits[0]}")
            found = [*found, *(u for limit in limits for u in limit.unenforced)]
            continue
        if (llguidance_refused := llguidance_grammar.refusal(candidate)) is None:
            return Served(candidate, found, original if found else None)
        if strict or refusal.keyword not in RELAXABLE or refusal.pointer is None:
            strictly = "strict JSON schema: " if strict else ""
            raise ConstraintError(
                f"{strictly}{candidate.outlines_refusal()}; {llguidance_refused}")
        found = [*found, Unenforced(refusal.keyword, refusal.pointer)]
    raise ConstraintError(f"the JSON schema needs more than {MAX_ROUNDS} keywords left out")
