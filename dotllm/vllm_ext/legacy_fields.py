"""Patch `legacy_fields`: honour `guided_json`, `guided_regex`, `guided_choice`,
`guided_grammar` and `guided_whitespace_pattern`.

vLLM 0.26 removed these request fields but its request models accept unknown fields, so
a client still sending them gets unconstrained output without a word. DotLLM maps them to
`structured_outputs` as older vLLM did. Targets (API server):
`ChatCompletionRequest.extract_structured_outputs` and
`CompletionRequest.extract_structured_outputs`.
"""

from __future__ import annotations

from dataclasses import replace

from dotllm.vllm_ext.patching import api_server_module, replace_attribute

NAME = "legacy_fields"

# legacy field -> StructuredOutputsParams field
_CONSTRAINTS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
_WHITESPACE = "guided_whitespace_pattern"


def merge_legacy_fields(params, extra: dict):
    """`params` (StructuredOutputsParams or None) with the legacy fields in `extra` applied."""
    from vllm.sampling_params import StructuredOutputsParams

    legacy = [old for old in _CONSTRAINTS if extra.get(old) is not None]
    whitespace = extra.get(_WHITESPACE)
    if len(legacy) > 1:
        raise ValueError(
            f"only one structured output constraint may be given, not {', '.join(legacy)}")
    if legacy and params is not None:
        raise ValueError("give a constraint either in structured_outputs/response_format "
                         f"or in {legacy[0]}, not both")
    if legacy:
        params = StructuredOutputsParams(**{_CONSTRAINTS[legacy[0]]: extra[legacy[0]]})
    if whitespace is not None and params is not None:
        params = replace(params, whitespace_pattern=whitespace)
    return params


def _with_legacy_fields(extract):
    def extract_structured_outputs(self):
        return merge_legacy_fields(extract(self), self.model_extra or {})

    return extract_structured_outputs


def apply(in_launcher: bool) -> bool:
    modules = [api_server_module(f"vllm.entrypoints.openai.{name}.protocol", in_launcher)
               for name in ("chat_completion", "completion")]
    if None in modules:
        return False
    chat, completion = modules
    for request_cls in (chat.ChatCompletionRequest, completion.CompletionRequest):
        replace_attribute(request_cls, "extract_structured_outputs", _with_legacy_fields, NAME)
    return True
