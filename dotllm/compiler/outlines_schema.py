"""The part of JSON Schema outlines-core 0.2.14 enforces exactly, and the rewriting into it.

outlines-core's regex builder reads one keyword of each schema (the first of properties,
allOf, anyOf, oneOf, prefixItems, enum, const, $ref, type) and silently drops its siblings:
`allOf` concatenates its branches (`{"a":5}{"b":-7}`), a `oneOf` beside `properties` is
lost (`{}` where a branch requires a property), `$ref`s past three levels drop the
property that holds them, a `pattern` beside `maxLength` is ignored. Rather than list what
it gets wrong, DotLLM rewrites every schema into forms it gets right, and refuses
(`NotForOutlines`: the request goes to llguidance) what does not fit:

- `$ref`s are inlined (a recursive one unrolled three levels deep, cut only where the
  value may be left out: an optional property, an `anyOf` branch, an empty array);
- `allOf` is intersected into one schema, the siblings of `anyOf`/`oneOf` into each
  branch, `type` lists split into branches; `enum`/`const` keep only the values the rest
  of the schema allows;
- a `oneOf` becomes an `anyOf` when its branches provably exclude each other, or can be
  made to by leaving out of a branch a property another branch requires;
- `required` names `properties` does not declare are declared (with the schema
  `additionalProperties` gives them);
- strings take one of a length range, a pattern (ECMA-262, written over the JSON text:
  `ecma_regex`) or an enforced `format` (`formats`);
- integers take their bounds (`minimum`, `maximum`, the exclusive ones, draft 4's
  boolean ones too) as a range regex (`integer_range`); a number's bounds are refused;
- annotations and unknown keywords are dropped, as validators ignore them.

The rewritten schema only allows documents the original allows (a subset where the
rewriting cuts recursion or leaves a property out). `normalize` gives it with ECMA
patterns (it is still JSON Schema: `validation` can check values against it); `encode`
gives what outlines-core compiles.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from collections.abc import Callable

from dotllm.compiler import ecma_regex, formats, integer_range
from dotllm.compiler.errors import ConstraintError

MAX_UNROLL = 3  # times one $ref may be expanded inside itself
MAX_NODES = 20_000  # schema nodes after expansion: past this, llguidance serves it

_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$comment", "$schema", "$id", "id",
    "$anchor", "$dynamicAnchor", "$vocabulary", "deprecated", "readOnly", "writeOnly",
    "contentMediaType", "contentEncoding", "contentSchema", "$defs", "definitions",
})
# Keywords outlines-core cannot be made to enforce here (llguidance takes some of them).
_UNSUPPORTED = frozenset({
    "multipleOf", "contains", "minContains", "maxContains", "patternProperties", "propertyNames",
    "dependencies", "dependentRequired", "dependentSchemas", "if", "then", "else", "not",
    "unevaluatedItems", "$dynamicRef", "$recursiveRef",
})
_STRING = ("minLength", "maxLength", "pattern", "format")
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_OBJECT = ("properties", "required", "additionalProperties", "minProperties",
           "maxProperties", "unevaluatedProperties")
_ARRAY = ("items", "prefixItems", "additionalItems", "minItems", "maxItems", "uniqueItems")
_KNOWN = frozenset({"type", "enum", "const", "$ref", "allOf", "anyOf", "oneOf",
                    *_STRING, *_BOUNDS, *_OBJECT, *_ARRAY}) | _UNSUPPORTED
_TYPES = ("null", "boolean", "object", "array", "number", "integer", "string")
_IMPLIED_BY = {"string": _STRING, "object": _OBJECT, "array": _ARRAY}


class NotForOutlines(Exception):
    """outlines-core cannot serve this schema exactly; the message names what and where,
    and `keyword` / `pointer` do where the rewriting stopped at one keyword."""

    def __init__(self, message: str, keyword: str | None = None, pointer: str | None = None):
        super().__init__(message)
        self.keyword = keyword
        self.pointer = pointer


def _refuse(keyword: str, where: str, why: str = "") -> NotForOutlines:
    return NotForOutlines(f"{keyword} at {where or '/'}{why}", keyword, where)


class _Unsatisfiable(Exception):
    """No value validates against this (sub)schema."""


class _Truncated(Exception):
    """A recursive $ref was unrolled as deep as it may go here."""


def _pointer(base: str, *parts) -> str:
    return base + "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _draft(schema) -> str:
    uri = schema.get("$schema", "") if isinstance(schema, dict) else ""
    uri = uri if isinstance(uri, str) else ""
    for old in ("draft-03", "draft-04", "draft-06", "draft-07"):
        if old in uri:
            return old
    return "2019-09" if "2019-09" in uri else "2020-12"


class _Normalizer:
    def __init__(self, root):
        self.root = root
        draft = _draft(root)
        self.ref_siblings_ignored = draft.startswith("draft")  # draft 7 and older
        self.expanding: list[tuple[str, int]] = []  # ($ref, value depth) being inlined
        self.depth = 0  # how many values deep the schema being read describes
        self.nodes = 0
        self.cuts = 0  # values left out where a recursive $ref was cut

    # -- references ------------------------------------------------------------------

    def resolve(self, ref: str, where: str):
        if not isinstance(ref, str):
            raise ConstraintError(f"$ref at {where} is not a string")
        root_id = self.root.get("$id") if isinstance(self.root, dict) else None
        if not ref.startswith("#"):
            if isinstance(root_id, str) and ref.startswith(root_id.rstrip("#") + "#"):
                ref = ref[len(root_id.rstrip("#")):]
            else:
                raise NotForOutlines(f"$ref {ref!r} at {where} is not local to the schema")
        fragment = urllib.parse.unquote(ref[1:])
        if fragment and not fragment.startswith("/"):
            found = _find_anchor(self.root, fragment)
            if found is None:
                raise ConstraintError(f"$ref {ref!r} at {where} points to nothing")
            return found, ""
        target = self.root
        for part in fragment.split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            elif isinstance(target, dict) and part in target:
                target = target[part]
            else:
                raise ConstraintError(f"$ref {ref!r} at {where} points to nothing")
        return target, fragment

    def expand(self, ref: str, where: str):
        target, pointer = self.resolve(ref, where)
        if (ref, self.depth) in self.expanding:
            raise ConstraintError(f"$ref {ref!r} at {where} refers back to itself without "
                                  "describing any value: no document can match it")
        if sum(r == ref for r, _ in self.expanding) >= MAX_UNROLL:
            raise _Truncated(where)
        self.expanding.append((ref, self.depth))
        try:
            return self.norm(target, pointer or where)
        finally:
            self.expanding.pop()

    # -- one schema ------------------------------------------------------------------

    def norm(self, schema, where: str) -> dict:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise NotForOutlines(f"the schema has over {MAX_NODES} parts once its $refs are "
                                 "expanded")
        if schema is True:
            return {}
        if schema is False:
            raise _Unsatisfiable(where)
        if not isinstance(schema, dict):
            raise ConstraintError(f"the schema at {where or '/'} is not an object or a boolean")
        rest = dict(schema)
        referred = None
        if "$ref" in rest:
            referred = self.expand(rest.pop("$ref"), where)
            if self.ref_siblings_ignored:
                return referred
        for keyword in list(rest):
            if keyword in _ANNOTATIONS or keyword not in _KNOWN:
                del rest[keyword]
            elif keyword in _UNSUPPORTED:
                raise _refuse(keyword, where)
        if rest.get("unevaluatedProperties", True) is not True and (
                referred is not None or {"allOf", "anyOf", "oneOf"} & set(rest)):
            # it also sees what those evaluate: read alone, it would close the object
            raise _refuse("unevaluatedProperties", where, " beside $ref or a combinator")
        all_of = rest.pop("allOf", None)
        any_of = rest.pop("anyOf", None)
        one_of = rest.pop("oneOf", None)
        values = None
        if "const" in rest:
            values = [rest.pop("const")]
        if "enum" in rest:
            enum = rest.pop("enum")
            if not isinstance(enum, list):
                raise ConstraintError(f"enum at {where or '/'} is not a list")
            values = enum if values is None else [v for v in values if _member(v, enum)]
        node = self.local(rest, where)
        if all_of is not None:
            for i, branch in enumerate(_schema_list(all_of, "allOf", where)):
                node = intersect(node, self.norm(branch, f"{where}/allOf/{i}"))
        if referred is not None:
            node = intersect(referred, node)
        if any_of is not None:
            node = intersect(node, self.any_of(_schema_list(any_of, "anyOf", where), where))
        if one_of is not None:
            node = self.one_of(_schema_list(one_of, "oneOf", where), node, where)
        if values is not None:
            node = _enum_node(_allowed(values, node), where)
        return node

    def any_of(self, branches: list, where: str) -> dict:
        nodes = []
        for i, branch in enumerate(branches):
            try:
                nodes.append(self.norm(branch, f"{where}/anyOf/{i}"))
            except (_Unsatisfiable, _Truncated):
                continue  # a branch no value (or no value within the unrolling) takes
        if not nodes:
            raise _Unsatisfiable(where)
        return _any_of(nodes)

    def one_of(self, branches: list, base: dict, where: str) -> dict:
        nodes = []
        for i, branch in enumerate(branches):
            try:
                nodes.append(intersect(base, self.norm(branch, f"{where}/oneOf/{i}")))
            except _Unsatisfiable:
                continue  # never matches, so never a second match either
            except _Truncated:
                raise _refuse("oneOf", where, f": recurses past {MAX_UNROLL} levels") from None
        # Each branch, narrowed where needed, must exclude every other branch as given:
        # then a value it allows matches exactly one of them.
        exclusive = []
        for i, node in enumerate(nodes):
            for j, other in enumerate(nodes):
                if i != j and not disjoint(node, other):
                    node = _without_a_name_of(node, other)
                    if node is None or not disjoint(node, other):
                        raise _refuse("oneOf", where, f": branches {i} and {j} may both match")
            exclusive.append(node)
        nodes = exclusive
        if not nodes:
            raise _Unsatisfiable(where)
        return _any_of(nodes)

    def local(self, schema: dict, where: str) -> dict:
        """The node for `type` and the type-specific keywords."""
        types = schema.get("type")
        if isinstance(types, str):
            types = [types]
        if types is None:
            # No type: the types the keywords speak of (a schema with `properties` asks
            # for an object), else any value.
            types = [t for t, keys in _IMPLIED_BY.items() if any(k in schema for k in keys)]
            if not types:
                if bound := next((k for k in _BOUNDS if k in schema), None):
                    raise _refuse(bound, where, " without a type")  # any value, if not a number
                return {}
        if not isinstance(types, list) or not all(t in _TYPES for t in types):
            raise ConstraintError(f"type at {where or '/'} is not a JSON type or a list of them")
        if "number" in types and "integer" in types:
            types = [t for t in types if t != "integer"]
        nodes = []
        for t in dict.fromkeys(types):
            try:
                nodes.append(self.typed(t, schema, where))
            except _Unsatisfiable:
                if len(types) == 1:
                    raise
        if not nodes:
            raise _Unsatisfiable(where)
        return _any_of(nodes)

    def typed(self, t: str, schema: dict, where: str) -> dict:
        if t == "string":
            return self.string(schema, where)
        if t == "object":
            return self.object(schema, where)
        if t == "array":
            return self.array(schema, where)
        if t == "integer":
            return _integer(schema, where)
        if t == "number" and (bound := next((k for k in _BOUNDS if k in schema), None)):
            raise _refuse(bound, where, " on a number")
        return {"type": t}  # bounds do not apply to other types

    def string(self, schema: dict, where: str) -> dict:
        node = {"type": "string"}
        low, high = _count(schema, "minLength", where), _count(schema, "maxLength", where)
        if low:
            node["minLength"] = low
        if high is not None:
            node["maxLength"] = high
        if low and high is not None and low > high:
            raise _Unsatisfiable(where)
        patterns = []
        if "pattern" in schema:
            patterns.append(_checked_pattern(schema["pattern"], f"{where}/pattern"))
        if "format" in schema:
            if (pattern := formats.pattern_for(schema["format"])) is None:
                raise _refuse("format", where)
            patterns.append(pattern)
        if patterns and (low or high is not None):
            raise _refuse("pattern" if "pattern" in schema else "format", where,
                          " beside minLength/maxLength")
        return _with_patterns(node, patterns, where)

    def value(self, schema, where: str) -> dict:
        """A schema one value deeper (a property, an item)."""
        self.depth += 1
        try:
            return self.norm(schema, where)
        finally:
            self.depth -= 1

    def object(self, schema: dict, where: str) -> dict:
        additional = schema.get("additionalProperties",
                                schema.get("unevaluatedProperties", True))
        cut: set[str] = set()  # names whose value a recursive $ref cut
        extra = self.optional_value(additional, f"{where}/additionalProperties", cut, "")
        low = _count(schema, "minProperties", where)
        high = _count(schema, "maxProperties", where)
        if "properties" not in schema and "required" not in schema:
            # Keys may repeat in what outlines-core writes: only "at least one" holds.
            if low and low > 1:
                raise _refuse("minProperties", where)
            if high is not None:
                raise _refuse("maxProperties", where)
            node = {"type": "object", "additionalProperties": extra}
            if low:
                node["minProperties"] = low
            return node
        declared = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(declared, dict):
            raise ConstraintError(f"properties at {where or '/'} is not an object")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ConstraintError(f"required at {where or '/'} is not a list of names")
        properties = {}
        for name, sub in declared.items():
            properties[name] = self.optional_value(sub, _pointer(where, "properties", name),
                                                   cut, name)
        for name in dict.fromkeys(required):
            if name not in properties:  # JSON Schema: present, with any value extras take
                properties[name] = extra
                if "" in cut:
                    cut.add(name)
            if name in cut:
                raise _Truncated(_pointer(where, "properties", name))
            if properties[name] is False:
                raise _Unsatisfiable(_pointer(where, "required"))
        node = {"type": "object", "properties": properties,
                "required": list(dict.fromkeys(required)), "additionalProperties": extra}
        return _check_counts(node, low, high, where)

    def optional_value(self, schema, where: str, cut: set[str], name: str):
        """A node, or False where no value (within the unrolling: `name` goes in `cut`)
        may be given."""
        try:
            return self.value(schema, where)
        except _Unsatisfiable:
            return False
        except _Truncated:
            self.cuts += 1
            cut.add(name)
            return False

    def array(self, schema: dict, where: str) -> dict:
        items, prefix = schema.get("items", True), schema.get("prefixItems")
        if isinstance(items, list):  # drafts before 2020-12: a tuple
            prefix, items = items, schema.get("additionalItems", True)
        low = _count(schema, "minItems", where) or 0
        high = _count(schema, "maxItems", where)
        if schema.get("uniqueItems") is True and (high is None or high > 1):
            raise _refuse("uniqueItems", where)
        node: dict = {"type": "array"}
        if prefix is not None:
            if not isinstance(prefix, list):
                raise ConstraintError(f"prefixItems at {where or '/'} is not a list")
            node["prefixItems"] = [self.value(s, f"{where}/prefixItems/{i}")
                                   for i, s in enumerate(prefix)]
        cut: set[str] = set()
        item = self.optional_value(items, f"{where}/items", cut, "items")
        if item is False:
            fixed = len(node.get("prefixItems", ()))
            high = fixed if high is None else min(high, fixed)
        else:
            node["items"] = item
        if low:
            node["minItems"] = low
        if high is not None:
            node["maxItems"] = high
        if high is not None and low > high:
            raise (_Truncated if cut else _Unsatisfiable)(where)
        return node


def _find_anchor(schema, name: str):
    stack = [schema]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("$anchor") == name or item.get("$id") == f"#{name}":
                return item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _schema_list(value, keyword: str, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise ConstraintError(f"{keyword} at {where or '/'} is not a non-empty list of schemas")
    return value


def _count(schema: dict, keyword: str, where: str) -> int | None:
    value = schema.get(keyword)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConstraintError(f"{keyword} at {where or '/'} is not a non-negative integer")
    return value


def _integer(schema: dict, where: str) -> dict:
    """An integer node with its bounds as integers, inclusive."""
    node: dict = {"type": "integer"}
    for key, side in (("minimum", 1), ("maximum", -1)):
        exclusive_key = "exclusiveM" + key[1:]
        exclusive = schema.get(exclusive_key)  # draft 4: a boolean beside the bound
        bounds = []
        if key in schema:
            bounds.append(_inside(_bound(schema[key], f"{where}/{key}"), side,
                                  exclusive is True))
        if exclusive is not None and not isinstance(exclusive, bool):
            bounds.append(_inside(_bound(exclusive, f"{where}/{exclusive_key}"), side, True))
        if bounds:
            node[key] = max(bounds) if side == 1 else min(bounds)
            if len(str(abs(node[key]))) > integer_range.MAX_DIGITS:
                raise _refuse(key, where, f" past {integer_range.MAX_DIGITS} digits")
    if "minimum" in node and "maximum" in node and node["minimum"] > node["maximum"]:
        raise _Unsatisfiable(where)
    return node


def _bound(value, where: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or \
            value in (float("inf"), float("-inf")):
        raise ConstraintError(f"{where} is not a number")
    return value


def _inside(value: float | int, side: int, exclusive: bool) -> int:
    """The first integer at or past `value` towards the inside of the range (side 1: up
    from a minimum, -1: down from a maximum), past it where the bound is exclusive."""
    whole = math.ceil(value) if side == 1 else math.floor(value)
    if exclusive and whole == value:
        whole += side
    return int(whole)


def _checked_pattern(pattern, where: str) -> str:
    if not isinstance(pattern, str):
        raise ConstraintError(f"pattern at {where} is not a string")
    try:
        ecma_regex.translate(pattern, ecma_regex.Mode.JSON_BODY)
    except ecma_regex.UnsupportedRegex as e:
        raise NotForOutlines(f"{e} (at {where})") from None
    return pattern


def _with_patterns(node: dict, patterns: list[str], where: str) -> dict:
    patterns = list(dict.fromkeys(patterns + ([node["pattern"]] if "pattern" in node else [])))
    if len(patterns) > 1:
        raise NotForOutlines(f"a string at {where or '/'} with several patterns or formats")
    if patterns:
        node = {**node, "pattern": patterns[0]}
    return node


def _check_counts(node: dict, low: int | None, high: int | None, where: str) -> dict:
    """minProperties / maxProperties beside `properties`: only what always holds."""
    present = sum(v is not False for v in node["properties"].values())
    if low and len(node["required"]) < low:
        raise _refuse("minProperties", where)
    if high is not None and present > high:
        raise _refuse("maxProperties", where)
    return node


def _member(value, values: list) -> bool:
    return any(_json_equal(value, v) for v in values)


def _json_equal(a, b) -> bool:
    """Equality as JSON Schema means it: 1 == 1.0, but true != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_json_equal, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _allowed(values: list, node: dict) -> list:
    """The values `node` allows (a normalized node is plain JSON Schema)."""
    if node == {}:
        return list(values)
    from dotllm.compiler.validation import OutputValidator

    validator = OutputValidator(node)
    return [v for v in values if validator.first_failure(v) is None]


def _enum_node(values: list, where: str) -> dict:
    unique: list = []
    for v in values:
        if not _member(v, unique):
            unique.append(v)
    if not unique:
        raise _Unsatisfiable(where)
    scalars = [v for v in unique if not isinstance(v, (dict, list))]
    nodes = [{"enum": scalars}] if scalars else []
    nodes += [_constant(v) for v in unique if isinstance(v, (dict, list))]
    return _any_of(nodes)


def _constant(value) -> dict:
    """A node allowing exactly `value` (an object or an array)."""
    if isinstance(value, dict):
        return {"type": "object", "properties": {k: _constant_or_enum(v) for k, v in
                                                  value.items()},
                "required": list(value), "additionalProperties": False}
    return {"type": "array", "prefixItems": [_constant_or_enum(v) for v in value],
            "minItems": len(value), "maxItems": len(value)}


def _constant_or_enum(value) -> dict:
    return _constant(value) if isinstance(value, (dict, list)) else {"enum": [value]}


def _any_of(nodes: list[dict]) -> dict:
    flat = []
    for node in nodes:
        flat.extend(node["anyOf"] if set(node) == {"anyOf"} else [node])
    if any(n == {} for n in flat):
        return {}
    return flat[0] if len(flat) == 1 else {"anyOf": flat}


def _family(node: dict) -> str | None:
    t = node.get("type")
    return "number" if t == "integer" else t


# -- intersection of normalized nodes -----------------------------------------------

def intersect(a: dict, b: dict) -> dict:
    """A node for values both nodes allow (_Unsatisfiable if none)."""
    if a == {}:
        return b
    if b == {}:
        return a
    for x, pair in ((a, lambda br: (br, b)), (b, lambda br: (a, br))):
        if set(x) == {"anyOf"}:  # distributed, `a`'s properties kept first
            out = []
            for branch in x["anyOf"]:
                try:
                    out.append(intersect(*pair(branch)))
                except _Unsatisfiable:
                    continue
            if not out:
                raise _Unsatisfiable("")
            return _any_of(out)
    for x, y in ((a, b), (b, a)):
        if "enum" in x:
            return _enum_node(_allowed(x["enum"], y), "")
    if _family(a) != _family(b):
        raise _Unsatisfiable("")
    merge: Callable = {"string": _intersect_strings, "object": _intersect_objects,
                       "array": _intersect_arrays}.get(a["type"], _intersect_scalars)
    return merge(a, b)


def _intersect_scalars(a: dict, b: dict) -> dict:
    if "integer" in (a["type"], b["type"]):  # a number's node has no bounds
        return _bounds(a, b, "minimum", "maximum", {"type": "integer"})
    return dict(a)


def _bounds(a: dict, b: dict, low: str, high: str, node: dict) -> dict:
    lows = [n[low] for n in (a, b) if low in n]
    highs = [n[high] for n in (a, b) if high in n]
    if lows:
        node[low] = max(lows)
    if highs:
        node[high] = min(highs)
    if lows and highs and node[low] > node[high]:
        raise _Unsatisfiable("")
    return node


def _intersect_strings(a: dict, b: dict) -> dict:
    node = _bounds(a, b, "minLength", "maxLength", {"type": "string"})
    return _with_patterns(node, [n["pattern"] for n in (a, b) if "pattern" in n], "")


def _intersect_arrays(a: dict, b: dict) -> dict:
    node = _bounds(a, b, "minItems", "maxItems", {"type": "array"})
    if "prefixItems" in a and "prefixItems" in b:
        raise NotForOutlines("allOf of two tuples")
    for x, y in ((a, b), (b, a)):
        if "prefixItems" in x:
            extra = y.get("items", {})
            node["prefixItems"] = [intersect(p, extra) for p in x["prefixItems"]]
    items = [n["items"] for n in (a, b) if "items" in n]
    if len(items) == 2:
        try:
            node["items"] = intersect(*items)
        except _Unsatisfiable:
            fixed = len(node.get("prefixItems", ()))
            node["maxItems"] = min(node.get("maxItems", fixed), fixed)
    elif items:
        node["items"] = items[0]
    if node.get("minItems", 0) > node.get("maxItems", node.get("minItems", 0)):
        raise _Unsatisfiable("")
    return node


def _intersect_objects(a: dict, b: dict) -> dict:
    if "properties" not in a and "properties" not in b:
        node = {"type": "object",
                "additionalProperties": _intersect_or_false(a["additionalProperties"],
                                                            b["additionalProperties"])}
        return _bounds(a, b, "minProperties", "maxProperties", node)
    for x, y in ((a, b), (b, a)):
        if "properties" not in x:  # no declared names: every name is an extra one
            x = {**x, "properties": {}, "required": []}
            if x.get("minProperties") or "maxProperties" in x:
                raise NotForOutlines("minProperties/maxProperties under allOf")
            return _intersect_objects(x, y)
    properties: dict = {}
    for name in dict.fromkeys([*a["properties"], *b["properties"]]):
        sides = [n["properties"].get(name, n["additionalProperties"]) for n in (a, b)]
        properties[name] = _intersect_or_false(*sides)
    required = list(dict.fromkeys([*a["required"], *b["required"]]))
    if any(properties.get(name) is False for name in required):
        raise _Unsatisfiable("")
    extra = _intersect_or_false(a["additionalProperties"], b["additionalProperties"])
    return {"type": "object", "properties": properties, "required": required,
            "additionalProperties": extra}


def _intersect_or_false(a, b):
    if a is False or b is False:
        return False
    try:
        return intersect(a, b)
    except _Unsatisfiable:
        return False


# -- telling oneOf branches apart ----------------------------------------------------

def disjoint(a: dict, b: dict) -> bool:
    """True when provably no value matches both nodes (False: it may)."""
    for x, y in ((a, b), (b, a)):
        if set(x) == {"anyOf"}:
            return all(disjoint(branch, y) for branch in x["anyOf"])
    for x, y in ((a, b), (b, a)):
        if "enum" in x:
            return not _allowed(x["enum"], y)
    if a == {} or b == {}:
        return False
    if _family(a) != _family(b):
        return True
    if a["type"] == "object" and "properties" in a and "properties" in b:
        for x, y in ((a, b), (b, a)):
            for name in x["required"]:
                if y["properties"].get(name, y["additionalProperties"]) is False:
                    return True
                if name in y["required"] and disjoint(x["properties"][name],
                                                      y["properties"][name]):
                    return True
    return False


def _without_a_name_of(node: dict, other: dict) -> dict | None:
    """`node` with a property `other` requires left out (a subset of what it allows), so
    that no value matches both; None if there is no such property."""
    if not (node.get("type") == other.get("type") == "object" and "properties" in node
            and "properties" in other):
        return None
    for name in other["required"]:
        if name not in node["required"]:
            return {**node, "properties": {**node["properties"], name: False}}
    return None


# -- what outlines-core compiles -----------------------------------------------------

def normalize(schema) -> dict:
    """`schema` in the forms outlines-core enforces (NotForOutlines if it has none;
    ConstraintError if the schema itself is wrong or can never be satisfied)."""
    if integer_range.MARKER_PREFIX in json.dumps(schema):
        raise NotForOutlines("the schema holds DotLLM's integer-range marker text")
    normalizer = _Normalizer(schema)
    try:
        return normalizer.norm(schema, "")
    except _Unsatisfiable as e:
        if normalizer.cuts:  # perhaps only because recursion was cut: llguidance decides
            raise NotForOutlines(f"recursive $refs cut at {e.args[0] or '/'}") from None
        raise ConstraintError(f"no JSON value can satisfy the schema (at {e.args[0] or '/'})"
                              ) from None
    except _Truncated as e:
        raise NotForOutlines(f"$ref at {e.args[0] or '/'} recurses past {MAX_UNROLL} levels "
                             "where the value cannot be left out") from None
    except RecursionError:
        raise NotForOutlines("the schema nests too deeply") from None


# Any JSON value. outlines-core writes `{}` as an alternation without parentheses, so
# inside a property `{"a": {}}` it split the whole object's regex (`{"a": true` alone
# matched): spelled as anyOf, it is grouped.
_ANY_VALUE = {"anyOf": [{"type": t} for t in
                        ("null", "boolean", "number", "string", "array", "object")]}


def encode(node: dict) -> dict:
    """A normalized node as the schema outlines-core compiles."""
    if node == {}:
        return _ANY_VALUE
    if "enum" in node:
        return node
    if set(node) == {"anyOf"}:
        return {"anyOf": [encode(n) for n in node["anyOf"]]}
    t = node["type"]
    if t == "string":
        if "pattern" not in node:
            return node
        if "minLength" in node or "maxLength" in node:  # met through allOf
            raise NotForOutlines("a string with both a pattern or format and a length")
        body = ecma_regex.translate(node["pattern"], ecma_regex.Mode.JSON_BODY)
        return {"type": "string", "pattern": f"(?:{body})"}
    if t == "object":
        return _encode_object(node)
    if t == "array":
        return _encode_array(node)
    if t == "integer" and ("minimum" in node or "maximum" in node):
        # outlines-core drops integer bounds: a marker it writes as it is, replaced in
        # its regex by the range's (ConstraintSpec.to_regex)
        return {"type": "string", "pattern": integer_range.marker(
            node.get("minimum"), node.get("maximum"))}
    return node


def _encode_object(node: dict) -> dict:
    if "properties" not in node:
        extra = node["additionalProperties"]
        if extra is False:
            return {"type": "object", "properties": {}}
        if node.get("minProperties", 0) > 1 or "maxProperties" in node:  # through allOf
            raise NotForOutlines("minProperties above 1 or maxProperties on an object "
                                 "without properties")
        out = {"type": "object"}
        if extra != {}:
            out["additionalProperties"] = encode(extra)
        if node.get("minProperties"):
            out["minProperties"] = node["minProperties"]
        return out
    properties = {}
    for name, sub in node["properties"].items():
        if json.dumps(name, ensure_ascii=False)[1:-1] != name:
            raise NotForOutlines(f"property name {name!r} needs escaping in JSON")
        if sub is not False:
            properties[name] = encode(sub)
    return {"type": "object", "properties": properties, "required": node["required"]}


def _encode_array(node: dict) -> dict:
    if "prefixItems" in node:
        n = len(node["prefixItems"])
        if node.get("minItems", 0) > n or node.get("maxItems", n) < n:
            raise NotForOutlines("prefixItems whose length minItems/maxItems change")
        return {"prefixItems": [encode(p) for p in node["prefixItems"]]}
    out = {"type": "array"}
    if node.get("items", {}) != {} and node.get("maxItems") != 0:
        out["items"] = encode(node["items"])  # else outlines-core's own any-value, grouped
    for key in ("minItems", "maxItems"):
        if key in node:
            out[key] = node[key]
    return out


def to_outlines(schema) -> dict:
    """The schema outlines-core compiles for `schema` (NotForOutlines, ConstraintError)."""
    return encode(normalize(schema))
