"""Patch `ready_grammar`: a request's grammar, once it is ready, is read without vLLM's
completion check.

vLLM 0.26's `StructuredOutputRequest.grammar` (vllm/v1/structured_output/request.py)
calls `_check_grammar_completion` on every read, and that imports `RequestStatus` anew
before it looks whether the grammar is still a Future. The scheduler and the
structured-output manager read a constrained request's grammar about three times a
step: 0.86 us a read on the CI machine's CPU, ~0.65 ms of the engine core's step at 256
requests (bench/test_engine_step.py), on the step's critical path. A grammar that is no
longer a Future is returned at once; one still compiling gets vLLM's own check.

Target: `StructuredOutputRequest._check_grammar_completion`.
"""

from __future__ import annotations

from concurrent.futures import Future

from dotllm.vllm_ext.patching import replace_attribute

NAME = "ready_grammar"


def _ready_first(stock):
    def _check_grammar_completion(self) -> bool:
        if not isinstance(self._grammar, Future):
            return True
        return stock(self)

    return _check_grammar_completion


def apply(in_launcher: bool) -> bool:
    if in_launcher:  # grammars live in the engine core
        return False
    from vllm.v1.structured_output.request import StructuredOutputRequest

    replace_attribute(StructuredOutputRequest, "_check_grammar_completion", _ready_first,
                      NAME)
    return True
