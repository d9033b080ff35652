"""Patch `request_validation`: structured-output requests are checked by DotLLM's rules.

Target (vLLM 0.26, API server): `SamplingParams._validate_structured_outputs`, which runs
before a request is queued and turns a ValueError into HTTP 400. Stock vLLM checks there
with xgrammar or guidance and rejects schemas DotLLM compiles; DotLLM instead runs its
cheap checks (`ConstraintSpec.check`: JSON, regex syntax, choices; and, for what
outlines-core cannot serve, whether llguidance can), so most bad constraints are a 400
naming the problem before any engine work; the rest fail in the engine and are reported
by `compile_errors`.
"""

from __future__ import annotations

from dotllm.vllm_ext.patching import replace_attribute

NAME = "request_validation"


def _validate_structured_outputs(self, model_config, structured_outputs_config, tokenizer):
    from dotllm.compiler import llguidance_grammar
    from dotllm.compiler.spec import ConstraintError
    from dotllm.settings import Settings
    from dotllm.vllm_ext.constraints import spec_from_params

    if structured_outputs_config is None or self.structured_outputs is None:
        return
    if tokenizer is None:
        raise ValueError("structured outputs need a tokenizer (not with --skip-tokenizer-init)")
    engine = Settings.from_environ().constraint_engine
    try:
        spec = spec_from_params(self.structured_outputs)
        spec.check()
        refusal, _ = llguidance_grammar.outlines_refusal(spec, engine)
        if refusal is not None and engine == "outlines":
            raise ConstraintError(refusal)
        if refusal is not None:
            llguidance_grammar.check(spec, refusal)
    except ConstraintError as e:
        raise ValueError(f"Invalid structured output: {e}") from None


def apply(in_launcher: bool) -> bool:
    from vllm.sampling_params import SamplingParams

    replace_attribute(SamplingParams, "_validate_structured_outputs",
            lambda _stock: _validate_structured_outputs, NAME)
    return True
