"""Patch `request_validation`: structured-output requests are checked by DotLLM's rules.

Targets (vLLM 0.26, API server): `SamplingParams._validate_structured_outputs`, which runs
before a request is queued and turns a ValueError into HTTP 400; and
`validate_structural_tag_payload` (`vllm.entrypoints.openai.engine.protocol`), with which
the request models check a structural tag through xgrammar, answering "Invalid
response_format structural_tag specification." whatever is wrong: DotLLM serves
structural tags itself, and its 400 names the part it cannot serve. Stock vLLM checks there
with xgrammar or guidance and rejects schemas DotLLM compiles; DotLLM instead runs its
cheap checks (`ConstraintSpec.check`: JSON, regex syntax, choices; and, for what
outlines-core cannot serve, whether llguidance can), so most bad constraints are a 400
naming the problem before any engine work; the rest fail in the engine and are reported
by `compile_errors`.
"""

from __future__ import annotations

from dotllm.vllm_ext.patching import api_server_module, replace_attribute

NAME = "request_validation"


def _validate_structured_outputs(self, model_config, structured_outputs_config, tokenizer):
    from dotllm.compiler.metrics import count_refusal
    from dotllm.compiler.spec import ConstraintError
    from dotllm.settings import Settings
    from dotllm.vllm_ext.constraints import checked

    if structured_outputs_config is None or self.structured_outputs is None:
        return
    if tokenizer is None:
        raise ValueError("structured outputs need a tokenizer (not with --skip-tokenizer-init)")
    settings = Settings.from_environ()
    try:
        checked("valid", self.structured_outputs, settings,
                lambda: _check(self.structured_outputs, settings))
    except ConstraintError as e:
        count_refusal(e.reason)
        raise ValueError(f"Invalid structured output: {e}") from None


def _check(params, settings) -> None:
    """ConstraintError if DotLLM cannot serve the constraint under these settings."""
    from dotllm.compiler import llguidance_grammar
    from dotllm.compiler.spec import ConstraintError
    from dotllm.vllm_ext.constraints import spec_from_params

    spec = spec_from_params(params, settings.limits)
    spec.check()
    refusal, _ = llguidance_grammar.outlines_refusal(spec, settings.constraint_engine)
    if refusal is not None and settings.constraint_engine == "outlines":
        raise ConstraintError(refusal)
    if refusal is not None:
        llguidance_grammar.check(spec, refusal)


def _structural_tag_checker(stock):
    def validate_structural_tag_payload(payload, *, parameter: str) -> None:
        from vllm.exceptions import VLLMValidationError

        from dotllm.compiler import llguidance_grammar
        from dotllm.compiler.metrics import count_refusal
        from dotllm.compiler.spec import ConstraintError, ConstraintSpec
        from dotllm.settings import Settings

        try:
            spec = ConstraintSpec.structural_tag(payload, Settings.from_environ().limits)
            why_not = llguidance_grammar.refusal(spec)
        except ConstraintError as e:
            why_not = str(e)
        if why_not is not None:
            count_refusal("invalid")
            raise VLLMValidationError(f"Invalid {parameter} structural_tag: {why_not}",
                                      parameter=parameter)

    return validate_structural_tag_payload


def apply(in_launcher: bool) -> bool:
    from vllm.sampling_params import SamplingParams

    replace_attribute(SamplingParams, "_validate_structured_outputs",
            lambda _stock: _validate_structured_outputs, NAME)
    protocol = api_server_module("vllm.entrypoints.openai.engine.protocol", in_launcher)
    if protocol is not None:
        replace_attribute(protocol, "validate_structural_tag_payload",
                          _structural_tag_checker, NAME)
    return True
