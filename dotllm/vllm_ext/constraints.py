"""vLLM's `StructuredOutputsParams` -> DotLLM's `ConstraintSpec`."""

from __future__ import annotations

from dotllm.compiler.spec import ConstraintError, ConstraintSpec


def spec_from_params(params) -> ConstraintSpec:
    """The constraint a request asks for; ConstraintError names what is wrong or unsupported."""
    whitespace = params.whitespace_pattern
    if whitespace is None and params.disable_any_whitespace:
        whitespace = ""
    if params.json is not None:
        return ConstraintSpec.json_schema(params.json, whitespace)
    if params.json_object:
        return ConstraintSpec.json_object(whitespace)
    if params.regex is not None:
        return ConstraintSpec.regex(params.regex)
    if params.choice is not None:
        return ConstraintSpec.choice(params.choice)
    if params.grammar is not None:
        return ConstraintSpec.grammar(params.grammar)
    if params.structural_tag is not None:
        return ConstraintSpec.structural_tag(params.structural_tag)
    raise ConstraintError("no structured output constraint given")
