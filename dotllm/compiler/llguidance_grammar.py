"""A constraint as llguidance's grammar: what serves it when outlines-core cannot.

outlines-core cannot compile Lark grammars, does not enforce some JSON
Schema keywords (`minimum`, `not`, ...), and may take too long or grow too large on a
schema; llguidance needs no compile. Its JSON whitespace is configured to lie within what
outlines-core's allows, so a request reads alike whichever engine served it.
"""

from __future__ import annotations

import json

import llguidance
from outlines_core.json_schema import WHITESPACE as OUTLINES_WHITESPACE

from dotllm.compiler import structural_tag
from dotllm.compiler.spec import ConstraintError, ConstraintKind, ConstraintSpec


def outlines_refusal(spec: ConstraintSpec, engine: str) -> tuple[str | None, str]:
    """Why outlines-core will not serve `spec` under `--dotllm-constraint-engine` (None
    if it may), and the metric label; the API server and the engine decide alike."""
    if engine == "llguidance":
        return "outlines-core is off (--dotllm-constraint-engine llguidance)", "configured"
    return spec.outlines_refusal(), spec.outlines_refusal_reason


def _json_options(whitespace_pattern: str | None) -> dict:
    """llguidance repeats its whitespace pattern between tokens; outlines-core's default,
    `[ ]?`, allows one space at most: llguidance then writes `{"a": 1, "b": 2}`, which
    that pattern allows too, so a request can move to the index mid-document."""
    if whitespace_pattern is None or whitespace_pattern == OUTLINES_WHITESPACE:
        return {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    if whitespace_pattern == "":
        return {"whitespace_flexible": False}  # compact: `{"a":1,"b":2}`
    return {"whitespace_pattern": whitespace_pattern}


_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions",
                          "dependentSchemas"})  # name -> subschema


def closed_objects(schema):
    """`schema` with no properties beyond those declared, wherever some are declared.

    outlines-core only ever writes declared properties (whatever `additionalProperties`
    says); llguidance follows JSON Schema and would let a model add its own (and ramble
    in their names). Closing the objects keeps llguidance's output within the index's.
    """
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {}
    for key, value in schema.items():
        if key in _DATA_KEYWORDS:
            closed[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            closed[key] = {name: closed_objects(sub) for name, sub in value.items()}
        else:
            closed[key] = closed_objects(value)
    if isinstance(schema.get("properties"), dict):
        closed["additionalProperties"] = False
    return closed


def grammar_for(spec: ConstraintSpec) -> str:
    """llguidance's grammar for `spec` (ConstraintError if it cannot express it)."""
    try:
        return _grammar_for(spec)
    except ConstraintError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise ConstraintError(f"llguidance cannot either: {short(str(e))}") from None


def _json_lark(schema) -> str:
    """A schema inside a Lark grammar (structural tags), configured like a JSON request."""
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise ConstraintError("a JSON schema must be an object or a boolean")
    schema = {**closed_objects(schema), "x-guidance": _json_options(None)}
    return "%json " + json.dumps(schema, ensure_ascii=False)


def _grammar_for(spec: ConstraintSpec) -> str:
    matcher = llguidance.LLMatcher
    if spec.kind in (ConstraintKind.JSON, ConstraintKind.JSON_OBJECT):
        return matcher.grammar_from_json_schema(
            closed_objects(json.loads(spec.source)),
            defaults=_json_options(spec.whitespace_pattern))
    if spec.kind is ConstraintKind.STRUCTURAL_TAG:
        return matcher.grammar_from_lark(
            structural_tag.to_lark(json.loads(spec.source), _json_lark))
    if spec.kind is ConstraintKind.REGEX:
        return matcher.grammar_from_regex(spec.source)
    if spec.kind is ConstraintKind.CHOICE:
        return matcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in json.loads(spec.source)))
    return matcher.grammar_from_lark(spec.source)


def short(error: str, limit: int = 400) -> str:
    """llguidance's errors can list every special token: keep a client's 400 readable."""
    error = error.strip()
    return error if len(error) <= limit else error[:limit] + " ..."


def check(spec: ConstraintSpec, why_not_outlines: str) -> None:
    """Cheap (no tokenizer, no matcher): ConstraintError if llguidance cannot serve `spec`
    either, naming both engines' reasons."""
    try:
        error = llguidance.LLMatcher.validate_grammar(grammar_for(spec))
    except ConstraintError as e:
        raise ConstraintError(f"{why_not_outlines}; {e}") from None
    if error:
        raise ConstraintError(f"{why_not_outlines}; llguidance cannot either: {short(error)}")
