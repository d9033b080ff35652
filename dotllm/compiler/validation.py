"""Checking a finished output against the whole schema, as JSON Schema defines it.

Used where DotLLM serves a schema it does not fully enforce (the response then says
whether the output validated) and by the soundness fuzzer (bench/soundness.py). Two
departures from `jsonschema`'s defaults make the check mean what the schema says:
`pattern` and `patternProperties` are ECMA-262 regexes (with `regress`: Python's `re` reads
`\\d` as any Unicode digit, as outlines-core did), the formats DotLLM enforces are
checked (`formats.ENFORCED`; JSON Schema leaves formats to the implementation), and
`multipleOf` is decided in decimal, as JSON writes numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import lru_cache

import jsonschema
import regress
from jsonschema import FormatChecker
from jsonschema.exceptions import ValidationError
from referencing.exceptions import Unresolvable

from dotllm.compiler.formats import ENFORCED

# 2020-12's checkers, whatever draft a schema names: a format DotLLM enforces means one
# thing (FormatChecker() alone would check `time` as draft 3 did).
FORMAT_CHECKER = FormatChecker(formats=())
FORMAT_CHECKER.checkers = {name: check for name, check in
                           jsonschema.Draft202012Validator.FORMAT_CHECKER.checkers.items()
                           if name in ENFORCED}
if missing := ENFORCED - set(FORMAT_CHECKER.checkers):  # a checker's package is missing
    raise ImportError(f"jsonschema cannot check the formats {sorted(missing)}")


@lru_cache(maxsize=4096)
def ecma(pattern: str) -> regress.Regex:
    """An ECMA-262 regex: with the `u` flag JSON Schema asks for, else Annex B's reading."""
    try:
        return regress.Regex(pattern, "u")
    except regress.RegressError:
        return regress.Regex(pattern)


def _pattern(validator, pattern, instance, schema):
    if validator.is_type(instance, "string") and ecma(pattern).find(instance) is None:
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(validator, pattern_properties, instance, schema):
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in pattern_properties.items():
        for name, value in instance.items():
            if ecma(pattern).find(name) is not None:
                yield from validator.descend(value, subschema, path=name,
                                             schema_path=pattern)


def _multiple_of(validator, divisor, instance, schema):
    """In decimal: a JSON number is decimal text, and 0.56 is a multiple of 0.01 (in binary
    floating point, 0.56 / 0.01 is 56.00000000000001)."""
    if not validator.is_type(instance, "number") or isinstance(divisor, bool):
        return
    try:
        remainder = Decimal(repr(instance)) % Decimal(repr(divisor))
    except (InvalidOperation, ValueError):
        return  # infinities, or a quotient past Decimal's precision: nothing to decide
    if remainder != 0:
        yield ValidationError(f"{instance!r} is not a multiple of {divisor!r}")


@lru_cache(maxsize=8)
def _ecma_validator(base):
    return jsonschema.validators.extend(
        base, {"pattern": _pattern, "patternProperties": _pattern_properties,
               "multipleOf": _multiple_of})


@dataclass(frozen=True)
class Failure:
    """Why a document does not validate: jsonschema's message, where in the document and
    which schema keyword (JSON pointers)."""

    message: str
    instance_pointer: str
    schema_pointer: str

    def __str__(self) -> str:
        return f"{self.message} (at {self.instance_pointer or '/'}, schema " \
               f"{self.schema_pointer or '/'})"


def _pointer(parts) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


class OutputValidator:
    """Validates documents against one schema (its draft from `$schema`, 2020-12 if none)."""

    def __init__(self, schema):
        base = jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator)
        self._validator = _ecma_validator(base)(schema, format_checker=FORMAT_CHECKER)

    def first_failure(self, value) -> Failure | None:
        try:
            error = next(self._validator.iter_errors(value), None)
        except (Unresolvable, RecursionError, regress.RegressError) as e:
            return Failure(f"the schema cannot be evaluated: {e}", "", "")
        if error is None:
            return None
        best = jsonschema.exceptions.best_match([error])
        return Failure(best.message[:300], _pointer(best.absolute_path),
                       _pointer(best.absolute_schema_path))

    def check_text(self, text: str) -> Failure | None:
        """A finished output's text: JSON that validates, or why not."""
        try:
            value = json.loads(text)
        except ValueError as e:
            return Failure(f"not a JSON document: {e}", "", "")
        return self.first_failure(value)
