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

from dotllm.compiler import ecma_regex, enforcement, formats, structural_tag
from dotllm.compiler.spec import ConstraintError, ConstraintKind, ConstraintSpec


def outlines_refusal(spec: ConstraintSpec, engine: str) -> tuple[str | None, str]:
    """Why outlines-core will not serve `spec` under `--dotllm-constraint-engine` (None
    if it may), and the metric label; the API server and the engine decide alike."""
    if engine == "llguidance":
        return "outlines-core is off (--dotllm-constraint-engine llguidance)", "configured"
    return spec.outlines_refusal(), spec.outlines_refusal_reason


def json_options(whitespace_pattern: str | None) -> dict:
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


# Closing an object beside these (or inside them) could forbid what they declare.
_COMBINED = frozenset({"allOf", "anyOf", "oneOf", "$ref"})


def for_llguidance(schema, in_branch: bool = False, whole_patterns: bool = False):
    """`schema` as llguidance should read it to enforce what JSON Schema means, within the
    index's output:

    - objects closed where properties are declared: outlines-core only ever writes
      declared properties (whatever `additionalProperties` says), and llguidance would
      let a model add its own (and ramble in their names); a `required` name that is not
      declared is declared first (with the schema `additionalProperties` gives extras),
      so closing the object does not make it unsatisfiable. Not a branch of allOf, anyOf
      or oneOf, nor an object beside them: closed alone, it would forbid what the others
      declare (`spec.rewritten_schema` has such schemas rewritten, where it can);
    - patterns read as ECMA-262 (`ecma_regex`: `\\d` is `[0-9]`), and the formats DotLLM
      enforces as its own patterns (`formats`), which only match valid values. With
      `whole_patterns` (a rewritten schema: outlines-core's reading), a string matches
      its pattern whole, not just somewhere (a subset, which is also what the index
      writes: a pattern searched for lets a random walk write on and on around it);
    - beside `patternProperties`, extra names held to every pattern's schema too (a
      subset): llguidance does not match a name holding an escape against the patterns.
    """
    if isinstance(schema, list):
        return [for_llguidance(item, in_branch, whole_patterns) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _DATA_KEYWORDS:
            out[key] = value
        elif key in _COMBINED:
            out[key] = for_llguidance(value, True, whole_patterns)
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            # a definition may be referred to as a branch: not closed at its root
            shared = key in ("$defs", "definitions")
            out[key] = {_pattern(name, ecma_regex.Mode.SEARCH_AS_FULL)
                        if key == "patternProperties" else name:
                        for_llguidance(sub, shared, whole_patterns)
                        for name, sub in value.items()}
        elif key == "pattern" and isinstance(value, str):
            out[key] = _whole(value) if whole_patterns else _pattern(value)
        elif key == "format" and (pattern := formats.pattern_for(value)) is not None:
            if "pattern" in schema:
                out["allOf"] = [*out.get("allOf", []), {"pattern": _pattern(pattern)}]
            else:
                out["pattern"] = _pattern(pattern)
        else:
            out[key] = for_llguidance(value, False, whole_patterns)
    if isinstance(patterns := out.get("patternProperties"), dict) and patterns and out.get(
            "additionalProperties", True) is not False:
        # llguidance takes a name with an escape in it (`a\\/b`) for one no pattern
        # matches: such names must also meet every pattern's schema.
        extra = out.get("additionalProperties", True)
        out["additionalProperties"] = {"allOf": [*([] if extra is True else [extra]),
                                                 *patterns.values()]}
    if isinstance(schema.get("properties"), dict) and not in_branch and not (
            _COMBINED & set(schema)):
        extra = out.get("additionalProperties", True)
        properties = out["properties"]
        if extra is not False and isinstance(schema.get("required"), list):
            for name in schema["required"]:
                if isinstance(name, str) and name not in properties:
                    properties[name] = {} if extra is True else extra
        out["additionalProperties"] = False
    return out


def _whole(pattern: str) -> str:
    return f"^(?:{ecma_regex.translate(pattern, ecma_regex.Mode.FULL)})$"


def _pattern(pattern: str, mode: ecma_regex.Mode = ecma_regex.Mode.SEARCH) -> str:
    """llguidance searches a string for its `pattern`, but matches a name against a
    `patternProperties` pattern whole."""
    return ecma_regex.translate(pattern, mode)


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
    schema = {**for_llguidance(schema), "x-guidance": json_options(None)}
    return "%json " + json.dumps(schema, ensure_ascii=False)


def _grammar_for(spec: ConstraintSpec) -> str:
    matcher = llguidance.LLMatcher
    if spec.kind in (ConstraintKind.JSON, ConstraintKind.JSON_OBJECT):
        rewritten = spec.rewritten_schema
        schema = spec.schema if rewritten is None else rewritten
        if (explosive := _explosive(schema)) is not None:
            raise ConstraintError(f"llguidance cannot either: {explosive}")
        return matcher.grammar_from_json_schema(
            for_llguidance(schema, whole_patterns=rewritten is not None),
            defaults=json_options(spec.whitespace_pattern))
    if spec.kind is ConstraintKind.STRUCTURAL_TAG:
        return matcher.grammar_from_lark(
            structural_tag.to_lark(json.loads(spec.source), _json_lark))
    if spec.kind is ConstraintKind.REGEX:
        return matcher.grammar_from_regex(ecma_regex.translate(spec.source, ecma_regex.Mode.FULL))
    if spec.kind is ConstraintKind.CHOICE:
        return matcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in json.loads(spec.source)))
    # Lark, or GBNF/EBNF as llama.cpp and xgrammar (stock vLLM's default) write it.
    return llguidance.grammar_from("grammar", spec.source)


def short(error: str, limit: int = 400) -> str:
    """llguidance's errors can list every special token: keep a client's 400 readable."""
    error = error.strip()
    return error if len(error) <= limit else error[:limit] + " ..."


# llguidance builds a grammar in time that grows with the schema, not always linearly: the
# API server asks it only about schemas up to this size (it answers a 60 KiB schema in
# milliseconds); larger ones are decided in the engine, off the API server's event loop.
CHECK_MAX_CHARS = 64 * 1024
# llguidance spells minProperties/maxProperties over optional properties as every subset
# of them: 400 optional ones took 3.6 s, 800 took 23 s and 13 GB. Past this many it is
# not asked.
MAX_OPTIONAL_WITH_COUNTS = 8


def _explosive(schema) -> str | None:
    """What in `schema` would make llguidance's grammar grow combinatorially, if any."""
    for node, pointer in enforcement.nodes(schema):
        if ("minProperties" in node or "maxProperties" in node) and isinstance(
                node.get("properties"), dict):
            required = node.get("required") if isinstance(node.get("required"), list) else []
            optional = len(set(node["properties"]) - set(required))
            if optional > MAX_OPTIONAL_WITH_COUNTS:
                keyword = "minProperties" if "minProperties" in node else "maxProperties"
                return (f"{keyword} at {pointer or '/'} beside {optional} optional properties "
                        f"(over {MAX_OPTIONAL_WITH_COUNTS}: its grammar would grow "
                        "combinatorially)")
    return None


def refusal(spec: ConstraintSpec) -> str | None:
    """Why llguidance cannot serve `spec` (None if it can). Cheap: no tokenizer, no
    matcher, and a spec over `CHECK_MAX_CHARS` is not asked (None: the engine tells)."""
    if len(spec.source) > CHECK_MAX_CHARS:
        return None
    try:
        error = llguidance.LLMatcher.validate_grammar(grammar_for(spec))
    except ConstraintError as e:
        return str(e)
    return f"llguidance cannot either: {short(error)}" if error else None


def check(spec: ConstraintSpec, why_not_outlines: str) -> None:
    """ConstraintError if llguidance cannot serve `spec` either, naming both engines'
    reasons (`refusal`)."""
    if (why_not := refusal(spec)) is not None:
        raise ConstraintError(f"{why_not_outlines}; {why_not}")
