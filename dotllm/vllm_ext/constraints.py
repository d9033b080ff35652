"""vLLM's `StructuredOutputsParams` -> DotLLM's `ConstraintSpec`."""

from __future__ import annotations

from dotllm.compiler.limits import Limits
from dotllm.compiler.spec import ConstraintError, ConstraintSpec
from dotllm.settings import Settings


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
