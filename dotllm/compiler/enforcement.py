"""What no engine here enforces in a JSON schema, and taking it out.

Neither outlines-core nor llguidance can generate under `uniqueItems`, `if`/`then`/`else`,
`not`, `dependencies`, `propertyNames`, `contains`, a regex with a look-around, or a
`format` DotLLM has no pattern for (`formats.ENFORCED`). Serving such a schema as if it
were enforced returns output that breaks it without a word. So a strict request (OpenAI's
`"strict": true`) is refused with each keyword and its JSON pointer, and any other request
is served the schema without them (`relax`), the rest enforced, and told what was left
out (`dotllm.compiler.relaxation`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

from dotllm.compiler import ecma_regex, formats

NEVER = frozenset({
    "uniqueItems", "contains", "minContains", "maxContains", "propertyNames",
    "dependencies", "dependentRequired", "dependentSchemas", "if", "then", "else", "not",
    "unevaluatedItems", "$dynamicRef", "$recursiveRef",
})

# Where subschemas sit: keyword -> how its value holds them.
_SCHEMA = ("items", "additionalItems", "additionalProperties", "unevaluatedProperties")
_SCHEMA_LIST = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SCHEMA_MAP = ("properties", "patternProperties", "$defs", "definitions")
_DATA = frozenset({"enum", "const", "default", "examples"})


@dataclass(frozen=True)
class Unenforced:
    """A keyword not enforced, in the schema at `pointer` (a JSON pointer); `member` names
    the one entry of a map keyword (`patternProperties`) meant."""

    keyword: str
    pointer: str
    member: str | None = None

    def __str__(self) -> str:
        return f"{self.keyword} at {self.pointer or '/'}"


def listed(found: list[Unenforced], limit: int = 8) -> str:
    text = ", ".join(map(str, found[:limit]))
    return text + (f" and {len(found) - limit} more" if len(found) > limit else "")


def escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def subschemas(schema: dict, pointer: str) -> Iterator[tuple[object, str]]:
    """(subschema, its pointer) for each schema directly inside `schema`."""
    for keyword in _SCHEMA:
        if isinstance(schema.get(keyword), dict):
            yield schema[keyword], f"{pointer}/{keyword}"
    for keyword in _SCHEMA_LIST:
        if isinstance(schema.get(keyword), list):
            for i, sub in enumerate(schema[keyword]):
                yield sub, f"{pointer}/{keyword}/{i}"
    for keyword in _SCHEMA_MAP:
        if isinstance(schema.get(keyword), dict):
            for name, sub in schema[keyword].items():
                yield sub, f"{pointer}/{keyword}/{escape(name)}"


def nodes(schema) -> Iterator[tuple[dict, str]]:
    """(schema object, its pointer) for `schema` and every schema inside it, in document
    order; iterative: a client can nest deeper than Python's recursion limit."""
    stack = [(schema, "")]
    while stack:
        node, pointer = stack.pop()
        if isinstance(node, dict):
            yield node, pointer
            stack.extend(reversed(list(subschemas(node, pointer))))


def never_enforced(schema) -> list[Unenforced]:
    """Every keyword of `schema` no engine here enforces, in document order.

    An invalid regex is the client's error (ConstraintError), not an unenforced keyword.
    """
    return [item for node, pointer in nodes(schema) for item in _in_one(node, pointer)]


def _in_one(schema: dict, pointer: str) -> Iterator[Unenforced]:
    for keyword in schema:
        if keyword in NEVER and not (keyword == "uniqueItems" and (
                schema[keyword] is not True or schema.get("maxItems", 2) in (0, 1))):
            yield Unenforced(keyword, pointer)
    fmt = schema.get("format")
    if isinstance(fmt, str) and fmt not in formats.ENFORCED:
        yield Unenforced("format", pointer)
    if isinstance(schema.get("pattern"), str) and not _servable(schema["pattern"]):
        yield Unenforced("pattern", pointer)
    if isinstance(schema.get("patternProperties"), dict):
        for name in schema["patternProperties"]:
            if not _servable(name, ecma_regex.Mode.SEARCH_AS_FULL):
                yield Unenforced("patternProperties", pointer, name)


def _servable(pattern: str, mode: ecma_regex.Mode = ecma_regex.Mode.SEARCH) -> bool:
    try:
        ecma_regex.translate(pattern, mode)
        return True
    except ecma_regex.UnsupportedRegex:
        return False


def _at(schema, pointer: str):
    node = schema
    for part in pointer.split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def relax(schema, found: list[Unenforced]):
    """A copy of `schema` without what `found` names: dropped, or (`oneOf`) read as
    `anyOf`, so that every document the schema allows is still allowed."""
    schema = copy.deepcopy(schema)
    for item in found:
        node = _at(schema, item.pointer)
        if item.keyword == "oneOf":
            branches = node.pop("oneOf")
            if "anyOf" in node:
                node["allOf"] = [*node.get("allOf", []), {"anyOf": branches}]
            else:
                node["anyOf"] = branches
        elif item.member is not None:
            del node[item.keyword][item.member]
            if not node[item.keyword]:
                del node[item.keyword]
        else:
            node.pop(item.keyword, None)
    return schema
