"""What a request constrains its output to, in a canonical form that keys caches.

Two requests that ask for the same constraint spelled differently (JSON key order,
whitespace) share one key, so they share one compiled index. The order of a schema's
`properties` is kept: outlines-core emits fields in that order, so it is part of what
the client asked for.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property

from outlines_core.json_schema import build_regex_from_schema

from dotllm.compiler import ecma_regex, enforcement, integer_range, outlines_schema
from dotllm.compiler.errors import ConstraintError
from dotllm.compiler.limits import Limits
from dotllm.compiler.memo import MISSING, Memo

DEFAULT_LIMITS = Limits()

# Keys whose object value is an ordered list of members, not a set of keywords.
_ORDERED_MEMBERS = frozenset({"properties"})

# Bumped whenever a constraint's regex changes for the same constraint (the schema
# rewriting, regex translation, formats): indexes cached before are then not reused.
REWRITE_VERSION = 5  # 4: a number's exponent sign optional; 5: integer bounds

# outlines-core's default whitespace, which it writes on both sides of every `:` and `,`
# and inside brackets (`{ "a" : 1 , "b" : [ 2 ] }`), and what it is dropped from.
_OUTLINES_SPACE = "[ ]?"
_NO_SPACE = ((_OUTLINES_SPACE + ":", ":"), (_OUTLINES_SPACE + ",", ","),
             ("\\{" + _OUTLINES_SPACE, "\\{"), (_OUTLINES_SPACE + "\\}", "\\}"),
             ("\\[" + _OUTLINES_SPACE, "\\["), (_OUTLINES_SPACE + "\\]", "\\]"))

# Any JSON value, for json_object requests: outlines-core builds it from an empty schema.
_ANY_JSON_OBJECT_SCHEMA = {"type": "object"}


class ConstraintKind(enum.Enum):
    JSON = "json"
    JSON_OBJECT = "json_object"
    REGEX = "regex"
    CHOICE = "choice"
    GRAMMAR = "grammar"  # Lark or GBNF, as llguidance reads them: not for outlines-core
    STRUCTURAL_TAG = "structural_tag"  # text with tagged regions: llguidance only


_JSON_KINDS = (ConstraintKind.JSON, ConstraintKind.JSON_OBJECT)
# What outlines-core cannot compile at all (llguidance serves it).
_NOT_FOR_OUTLINES = {
    ConstraintKind.GRAMMAR: "outlines-core does not compile grammar constraints",
    ConstraintKind.STRUCTURAL_TAG: "outlines-core does not compile structural tags",
}


def _canonical(value, ordered: bool = False):
    if isinstance(value, dict):
        items = value.items() if ordered else sorted(value.items())
        return {k: _canonical(v, ordered=k in _ORDERED_MEMBERS) for k, v in items}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def _standard_layout(regex: str) -> str:
    """The default layout is `json.dumps`'s, `{"a": 1, "b": [2, 3]}`: at most one space,
    after `:` and `,` only (what llguidance writes, and what vLLM's streaming tool-call
    parser reads: `"parameters" :` lost the arguments' `{`). Only narrows: nothing but
    outlines-core's whitespace is written `[ ]?` (patterns come from `ecma_regex`, which
    writes a space `\\x20`; enum and const values are escaped), and each is optional."""
    for spaced, tight in _NO_SPACE:
        regex = regex.replace(spaced, tight)
    return regex


# outlines-core's JSON number wants a sign after the exponent's `e` (`1e+5`, not `1e5`);
# JSON's grammar, and llguidance, make it optional. Only that regex has this text: patterns
# come out of ecma_regex as `[Ee][\+\-]`, enum and const values escaped.
_OUTLINES_EXPONENT = "[eE][+-][0-9]+"
_JSON_EXPONENT = "[eE][+-]?[0-9]+"


def _json_numbers(regex: str) -> str:
    """Numbers as JSON writes them: llguidance's `1e5` must not stop a hand-over."""
    return regex.replace(_OUTLINES_EXPONENT, _JSON_EXPONENT)


def _dumps(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _json_value(value, what: str, limits: Limits):
    """`value` parsed if it is text, checked against `limits` either way."""
    if isinstance(value, str):
        limits.check_text(value, what)
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConstraintError(f"{what} is not valid JSON: {e}") from None
        except RecursionError:
            raise ConstraintError(f"{what} nests deeper than {limits.depth} levels "
                                  "(--dotllm-max-schema-depth)") from None
    limits.check_json(value, what)
    return value


# JSON schemas' `outlines_refusal_error` (the error, or None) by spec key: digests and
# short texts, a few hundred KiB at most.
REFUSALS_KEPT = 4096
_refusals = Memo(REFUSALS_KEPT)


@dataclass(frozen=True)
class ConstraintSpec:
    kind: ConstraintKind
    source: str  # canonical: JSON text for JSON and CHOICE, the pattern for REGEX
    whitespace_pattern: str | None = None

    @classmethod
    def json_schema(cls, schema: str | dict, whitespace_pattern: str | None = None,
                    limits: Limits = DEFAULT_LIMITS):
        schema = _json_value(schema, "JSON schema", limits)
        if not isinstance(schema, (dict, bool)):
            raise ConstraintError("JSON schema must be an object or a boolean")
        return cls(ConstraintKind.JSON, _dumps(_canonical(schema)), whitespace_pattern)

    @classmethod
    def json_object(cls, whitespace_pattern: str | None = None):
        return cls(ConstraintKind.JSON_OBJECT, _dumps(_ANY_JSON_OBJECT_SCHEMA),
                   whitespace_pattern)

    @classmethod
    def regex(cls, pattern: str, limits: Limits = DEFAULT_LIMITS):
        if not isinstance(pattern, str) or not pattern:
            raise ConstraintError("regex must be a non-empty string")
        limits.check_regex(pattern)
        return cls(ConstraintKind.REGEX, pattern)

    @classmethod
    def choice(cls, choices: list[str] | str, limits: Limits = DEFAULT_LIMITS):
        if isinstance(choices, str):
            limits.check_text(choices, "choice")
            try:
                choices = json.loads(choices)
            except json.JSONDecodeError as e:
                raise ConstraintError(f"choice is not a JSON list of strings: {e}") from None
        if not isinstance(choices, list) or not choices:
            raise ConstraintError("choice must be a non-empty list of strings")
        limits.check_choices(len(choices), "choice")
        if not all(isinstance(c, str) for c in choices):
            raise ConstraintError("every choice must be a string")
        limits.check_text(_dumps(choices), "choice")
        return cls(ConstraintKind.CHOICE, _dumps(choices))

    @classmethod
    def grammar(cls, text: str, limits: Limits = DEFAULT_LIMITS):
        if not isinstance(text, str) or not text.strip():
            raise ConstraintError("grammar must be a non-empty string")
        limits.check_text(text, "grammar")
        return cls(ConstraintKind.GRAMMAR, text)

    @classmethod
    def structural_tag(cls, payload: str | dict, limits: Limits = DEFAULT_LIMITS):
        payload = _json_value(payload, "structural_tag", limits)
        if not isinstance(payload, dict):
            raise ConstraintError("structural_tag must be a JSON object")
        return cls(ConstraintKind.STRUCTURAL_TAG, _dumps(_canonical(payload)))

    @cached_property
    def key(self) -> str:
        """A short stable digest of everything that determines the compiled index."""
        text = json.dumps([REWRITE_VERSION, self.kind.value, self.whitespace_pattern,
                           self.source])
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def is_json(self) -> bool:
        """Its output is one JSON text."""
        return self.kind in _JSON_KINDS

    def check(self) -> None:
        """Cheap checks, safe in the API server: they take time linear in the request.

        Building the regex is not one: a small schema with nested `$ref`s or `anyOf`s can
        expand to a regex of many megabytes, and outlines-core holds the GIL while it
        builds. That happens in a compile worker (`to_regex`), under its time limit.
        """
        if self.kind is ConstraintKind.REGEX:
            ecma_regex.translate(self.source, ecma_regex.Mode.FULL)
        if self.kind in _JSON_KINDS:
            if found := enforcement.never_enforced(self.schema):
                raise ConstraintError(
                    f"JSON schema uses what no engine here enforces: {enforcement.listed(found)}")
            self._normalized  # noqa: B018  (an invalid schema raises here)

    @cached_property
    def schema(self):
        """The JSON schema (JSON and JSON_OBJECT constraints)."""
        return json.loads(self.source)

    @cached_property
    def _normalized(self) -> dict | outlines_schema.NotForOutlines:
        """The JSON schema rewritten into what outlines-core enforces, or why it cannot be."""
        try:
            return outlines_schema.normalize(self.schema)
        except outlines_schema.NotForOutlines as e:
            return e

    @cached_property
    def _outlines_schema(self) -> dict | outlines_schema.NotForOutlines:
        """What outlines-core compiles for a JSON constraint, or why it cannot."""
        if isinstance(node := self._normalized, outlines_schema.NotForOutlines):
            return node
        try:
            return outlines_schema.encode(node)
        except outlines_schema.NotForOutlines as e:
            return e

    @property
    def rewritten_schema(self) -> dict | None:
        """The schema rewritten into what outlines-core enforces, None where it has none.
        llguidance serves it too where there is one: both tiers then write the same
        documents, and a request moves between them freely."""
        node = self._normalized
        return None if isinstance(node, outlines_schema.NotForOutlines) else node

    def with_schema(self, schema) -> ConstraintSpec:
        """The same JSON constraint with another schema (a relaxed one)."""
        return ConstraintSpec(ConstraintKind.JSON, _dumps(_canonical(schema)),
                              self.whitespace_pattern)

    def outlines_refusal_error(self) -> outlines_schema.NotForOutlines | None:
        """Where outlines-core's rewriting of a JSON schema stopped, if it did.

        Remembered by the spec's key: it takes the schema's whole rewriting (~0.4 ms for a
        Glaiveai2K schema on the CI machine's CPU), which every request paid on the
        engine's grammar thread, warm index or not, and twice in the API server (its
        relaxation and its validation each make their own spec); requests arriving
        together wait on each other there."""
        if self.kind not in _JSON_KINDS:
            return None
        if (known := _refusals.get(self.key)) is not MISSING:
            return known
        refusal = self._outlines_schema
        if isinstance(refusal, outlines_schema.NotForOutlines):
            # A copy never raised: no traceback holding the rewriting's frames.
            refusal = outlines_schema.NotForOutlines(str(refusal), refusal.keyword,
                                                     refusal.pointer)
        else:
            refusal = None
        _refusals.put(self.key, refusal)
        return refusal

    def outlines_refusal(self) -> str | None:
        """Why outlines-core cannot serve this constraint, known without compiling; None
        if it may (the compile still decides). Such constraints go to llguidance."""
        if self.kind in _NOT_FOR_OUTLINES:
            return _NOT_FOR_OUTLINES[self.kind]
        if (refusal := self.outlines_refusal_error()) is None:
            return None
        return f"outlines-core cannot enforce the JSON schema exactly: {refusal}"

    @property
    def outlines_refusal_reason(self) -> str:
        """The metric label for `outlines_refusal`: the kind, or "keywords"."""
        return self.kind.value if self.kind in _NOT_FOR_OUTLINES else "keywords"

    def to_regex(self) -> str:
        """The regex outlines-core compiles (raises ConstraintError when there is none).

        Can take long and much memory for a large schema: run it where it can be stopped.
        """
        self.check()
        if (refusal := self.outlines_refusal()) is not None:
            raise ConstraintError(refusal)
        if self.kind is ConstraintKind.REGEX:
            return ecma_regex.translate(self.source, ecma_regex.Mode.FULL)
        if self.kind is ConstraintKind.CHOICE:
            return "|".join(f"({re.escape(c)})" for c in json.loads(self.source))
        schema = self._outlines_schema
        try:
            regex = build_regex_from_schema(_dumps(schema), self.whitespace_pattern)
        except (ValueError, TypeError) as e:
            raise ConstraintError(f"unsupported JSON schema: {e}") from None
        regex = _json_numbers(regex)
        if self.whitespace_pattern is None:
            regex = _standard_layout(regex)
        return integer_range.substitute(regex)
