"""vLLM's `StructuredOutputsParams` -> DotLLM's `ConstraintSpec`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import TypeVar

from dotllm.compiler.limits import Limits
from dotllm.compiler.memo import MISSING, Memo
from dotllm.compiler.spec import ConstraintError, ConstraintSpec
from dotllm.settings import Settings

T = TypeVar("T")
# What the API server found of a request's constraint, by what it was made from (and the
# settings it was checked under), bounded by the keys' text: the answers are None or a 400's
# message, but for the few schemas served relaxed (their `relaxation.Served`).
CHECKED_TEXT_BYTES = 16 * 2**20
_checked = Memo(CHECKED_TEXT_BYTES)


def spec_from_params(params, limits: Limits | None = None) -> ConstraintSpec:
    """The constraint a request asks for; ConstraintError names what is wrong, unsupported
    or over a bound (`limits`, by default the server's)."""
    limits = limits or Settings.from_environ().limits
    whitespace = params.whitespace_pattern
    if whitespace is None and params.disable_any_whitespace:
        whitespace = ""
    if params.json is not None:
        return ConstraintSpec.json_schema(params.json, whitespace, limits)
    if params.json_object:
        return ConstraintSpec.json_object(whitespace)
    if params.regex is not None:
        return ConstraintSpec.regex(params.regex, limits)
    if params.choice is not None:
        return ConstraintSpec.choice(params.choice, limits)
    if params.grammar is not None:
        return ConstraintSpec.grammar(params.grammar, limits)
    if params.structural_tag is not None:
        return ConstraintSpec.structural_tag(params.structural_tag, limits)
    raise ConstraintError("no structured output constraint given")


def params_text(params) -> str:
    """Every public field of the params, as text: equal for requests that ask the same."""
    return json.dumps([getattr(params, f.name) for f in dataclasses.fields(params)
                       if not f.name.startswith("_")], default=str)


def checked(question: str, params, settings: Settings, answer: Callable[[], T]) -> T:
    """`answer()` (its value, or the ConstraintError it raised), the first time a question
    is asked of equal params under equal settings; remembered after (dotllm.compiler.memo),
    so a request repeating an earlier one pays a key's serialization instead of the
    schema's checks."""
    text = params_text(params)
    key = (question, text, settings)
    if (known := _checked.get(key)) is MISSING:
        try:
            known = (True, answer())
        except ConstraintError as e:
            known = (False, (str(e), e.reason))
        _checked.put(key, known, cost=len(text))
    ok, value = known
    if not ok:
        raise ConstraintError(*value)  # a new one each time: no traceback kept
    return value
