"""structural_tag constraints as Lark, for llguidance: free text with tagged regions
(tool calls, thoughts) whose content is constrained.

vLLM 0.26 accepts two forms. The legacy one (`structures` of begin/schema/end, and
`triggers`) means: any text, and wherever a trigger appears, one of its structures. It is
read as xgrammar's `triggered_tags`, so both forms take one path. xgrammar's `format`
tree is translated for the text-level formats; token-level ones and options llguidance has
no counterpart for are refused by name (a 400), never silently dropped.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from dotllm.compiler.spec import ConstraintError

_TEXT = r"/(.|\n)*/"  # any text; in a [lazy] rule it stops at the first match of what follows
_FORMATS = ("const_string", "json_schema", "any_text", "regex", "sequence", "or", "tag",
            "triggered_tags", "tags_with_separator", "optional", "plus", "star", "repeat")
# Options whose defaults are the only values supported (anything else changes the meaning).
_DEFAULTS = {"style": "json", "any_order": False, "max_whitespace_cnt": None, "excludes": [],
             "max_tokens": None, "max_chars": None}


def to_lark(payload: dict, json_lark: Callable[[object], str]) -> str:
    """The Lark grammar for a structural_tag payload; `json_lark(schema)` is the Lark
    expression (`%json {...}`) for one JSON Schema, so that JSON is written as elsewhere."""
    if not isinstance(payload, dict):
        raise ConstraintError("structural_tag must be a JSON object")
    if "format" in payload:
        root = payload["format"]
    elif "structures" in payload:
        root = _legacy_as_format(payload)
    else:
        raise ConstraintError("structural_tag needs `format`, or `structures` and `triggers`")
    lark = _LarkWriter(json_lark)
    start = lark.expr(root, at_end=True)
    return "\n".join([f"start: {start}", *lark.rules])


def _legacy_as_format(payload: dict) -> dict:
    structures, triggers = payload.get("structures"), payload.get("triggers")
    if not isinstance(structures, list) or not structures:
        raise ConstraintError("structural_tag `structures` must be a non-empty list")
    if not isinstance(triggers, list) or not all(isinstance(t, str) and t for t in triggers):
        raise ConstraintError("structural_tag `triggers` must be a list of non-empty strings")
    tags = []
    for s in structures:
        if not isinstance(s, dict):
            raise ConstraintError("each structural_tag structure must be an object")
        tags.append({"type": "tag", "begin": s.get("begin"), "end": s.get("end"),
                     "content": {"type": "json_schema", "json_schema": s.get("schema", True)}})
    return {"type": "triggered_tags", "triggers": triggers, "tags": tags}


class _LarkWriter:
    def __init__(self, json_lark: Callable[[object], str]):
        self.json_lark = json_lark
        self.rules: list[str] = []

    def rule(self, body: str, lazy: bool = False) -> str:
        name = f"r{len(self.rules)}"
        self.rules.append(f"{name}{'[lazy]' if lazy else ''}: {body}")
        return name

    def expr(self, f, at_end: bool = False) -> str:
        """A Lark expression for format `f`; `at_end`: nothing follows it."""
        kind = _kind(f)
        if kind == "const_string":
            return _literal(_field(f, "value", str))
        if kind == "json_schema":
            return self.json_lark(f.get("json_schema", True))
        if kind == "regex":
            return "/" + _field(f, "pattern", str).replace("/", "\\/") + "/"
        if kind == "any_text":
            if not at_end:
                raise ConstraintError(
                    "structural_tag any_text is supported only as a tag's content or last")
            return _TEXT
        if kind in ("sequence", "or"):
            elements = _field(f, "elements", list)
            if not elements:
                raise ConstraintError(f"structural_tag {kind} needs elements")
            if kind == "or":
                return "(" + " | ".join(self.expr(e, at_end) for e in elements) + ")"
            last = len(elements) - 1
            return " ".join(self.expr(e, at_end and i == last) for i, e in enumerate(elements))
        if kind == "tag":
            return _literal(_field(f, "begin", str)) + " " + self.tag_rest(f)
        if kind == "triggered_tags":
            return self.triggered_tags(f)
        if kind == "tags_with_separator":
            tags = [self.expr(_tag(t)) for t in _field(f, "tags", list)]
            one = "(" + " | ".join(tags) + ")"
            if f.get("stop_after_first", False):
                return one if f.get("at_least_one", False) else f"{one}?"
            many = f"{one} ({_literal(_field(f, 'separator', str))} {one})*"
            return many if f.get("at_least_one", False) else f"({many})?"
        inner = self.expr(f.get("content"))
        if kind == "repeat":
            low, high = _field(f, "min", int), _field(f, "max", int)
            return f"({inner}){{{low},{high}}}"
        return f"({inner})" + {"optional": "?", "plus": "+", "star": "*"}[kind]

    def tag_rest(self, tag: dict, after_begin: str = "") -> str:
        """What follows a tag's begin (`after_begin`: the part of it not yet written)."""
        ends = tag.get("end")
        ends = [ends] if isinstance(ends, str) else ends
        if not isinstance(ends, list) or not ends or not all(isinstance(e, str) for e in ends):
            raise ConstraintError("a structural_tag tag's `end` must be a string or strings")
        end = "(" + " | ".join(_literal(e) for e in ends if e) + ")" if any(ends) else ""
        head = _literal(after_begin) + " " if after_begin else ""
        content = tag.get("content")
        if _kind(content) == "any_text" and end:  # _kind checked its options
            return head + self.rule(f"{_TEXT} {end}", lazy=True)  # text up to the first end
        return f"{head}{self.expr(content)} {end}".rstrip()

    def triggered_tags(self, f: dict) -> str:
        triggers = _field(f, "triggers", list)
        if not triggers or not all(isinstance(t, str) and t for t in triggers):
            raise ConstraintError("structural_tag triggers must be non-empty strings")
        by_trigger: dict[str, list[str]] = {t: [] for t in triggers}
        for tag in map(_tag, _field(f, "tags", list)):
            begin = _field(tag, "begin", str)
            trigger = next((t for t in triggers if begin.startswith(t)), None)
            if trigger is None:
                raise ConstraintError(
                    f"structural_tag tag {begin!r} starts with none of the triggers {triggers}")
            by_trigger[trigger].append(self.tag_rest(tag, begin[len(trigger):]))
        # Text up to the first occurrence of a trigger, then one of that trigger's tags.
        one = self.rule(" | ".join(
            self.rule(f"{_TEXT} {_literal(t)}", lazy=True) + " (" + " | ".join(rests) + ")"
            for t, rests in by_trigger.items() if rests))
        at_least_one, stop = f.get("at_least_one", False), f.get("stop_after_first", False)
        if stop:
            return one if at_least_one else f"({one} | {_TEXT})"
        return f"{one}{'+' if at_least_one else '*'} {_TEXT}"


def _kind(f) -> str:
    if not isinstance(f, dict):
        raise ConstraintError("each structural_tag format must be an object")
    kind = f.get("type")
    if kind not in _FORMATS:
        raise ConstraintError(f"structural_tag format {kind!r} is not supported by DotLLM "
                              f"(supported: {', '.join(_FORMATS)})")
    _check_defaults(f)
    return kind


def _check_defaults(f: dict) -> None:
    for option, default in _DEFAULTS.items():
        if option in f and f[option] != default:
            raise ConstraintError(f"structural_tag {f.get('type')} option {option}="
                                  f"{json.dumps(f[option])} is not supported by DotLLM")


def _tag(f) -> dict:
    if _kind(f) != "tag":
        raise ConstraintError("structural_tag `tags` must hold formats of type tag")
    return f


def _field(f: dict, name: str, kind: type):
    value = f.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ConstraintError(
            f"structural_tag {f.get('type')} needs `{name}` ({kind.__name__})")
    return value


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
