"""JSON Schema keywords outlines-core 0.2.14 accepts but does not enforce.

Its regex builder skips them silently, so output built from the regex can break them
(an `age` of 39685 under `maximum: 150`). Measured by building each keyword's schema
with and without it: the regex is the same. A schema that uses one is refused with the
keyword and where it is, rather than answered with output that does not validate.
`additionalProperties` and `unevaluatedProperties` are safe where `properties` is
given: only the declared properties are ever produced.
"""

from __future__ import annotations

from collections.abc import Iterator

UNENFORCED = frozenset({
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    "uniqueItems", "contains", "minContains", "maxContains",
    "minProperties", "maxProperties", "patternProperties", "propertyNames",
    "dependentRequired", "dependentSchemas", "dependencies",
    "if", "then", "else", "not",
})
_SAFE_WITH_PROPERTIES = frozenset({"additionalProperties", "unevaluatedProperties"})

# Where subschemas sit: keyword -> how its value holds them.
_SCHEMA = ("items", "additionalItems", "additionalProperties", "unevaluatedProperties",
           "unevaluatedItems", "contains", "propertyNames", "if", "then", "else", "not")
_SCHEMA_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def unenforced_keywords(schema, path: str = "") -> Iterator[tuple[str, str]]:
    """(keyword, JSON pointer of the schema using it) for each keyword outlines-core skips."""
    if not isinstance(schema, dict):
        return
    for keyword, value in schema.items():
        if keyword in UNENFORCED and not (keyword == "uniqueItems" and value is False):
            yield keyword, path or "/"
        if keyword in _SAFE_WITH_PROPERTIES and "properties" not in schema and value is not True:
            yield keyword, path or "/"
    for keyword in _SCHEMA:
        if isinstance(schema.get(keyword), dict):
            yield from unenforced_keywords(schema[keyword], f"{path}/{keyword}")
    for keyword in _SCHEMA_LIST:
        if isinstance(schema.get(keyword), list):
            for i, sub in enumerate(schema[keyword]):
                yield from unenforced_keywords(sub, f"{path}/{keyword}/{i}")
    for keyword in _SCHEMA_MAP:
        if isinstance(schema.get(keyword), dict):
            for name, sub in schema[keyword].items():
                yield from unenforced_keywords(sub, f"{path}/{keyword}/{_escape(name)}")


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")
