"""The `ready_grammar` patch: a ready grammar is read at once, anything else as vLLM does."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
from vllm.sampling_params import StructuredOutputsParams
from vllm.v1.request import RequestStatus
from vllm.v1.structured_output.request import StructuredOutputRequest

from dotllm.vllm_ext import ready_grammar
from dotllm.vllm_ext.patching import patches_on


@pytest.fixture
def patched(monkeypatch):
    monkeypatch.setattr(StructuredOutputRequest, "_check_grammar_completion",
                        StructuredOutputRequest._check_grammar_completion)
    assert ready_grammar.apply(in_launcher=False)
    assert ready_grammar.apply(in_launcher=False)  # idempotent
    assert not ready_grammar.apply(in_launcher=True)
    assert patches_on(StructuredOutputRequest._check_grammar_completion) == [ready_grammar.NAME]


def _request(grammar) -> StructuredOutputRequest:
    request = StructuredOutputRequest(params=StructuredOutputsParams(regex="[0-9]+"))
    request.status = RequestStatus.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR
    request.grammar = grammar
    return request


def test_a_ready_grammar_is_read_without_the_check(patched):
    grammar = object()
    request = _request(grammar)
    assert request.grammar is grammar and request.is_grammar_ready
    # The check that sets the status when a Future resolves does not run: nothing to set.
    assert request.status == RequestStatus.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR


def test_a_compiling_grammar_keeps_vllms_check(patched):
    future: Future = Future()
    request = _request(future)
    assert request.grammar is None and not request.is_grammar_ready
    grammar = object()
    future.set_result(grammar)
    assert request.grammar is grammar
    assert request.status == RequestStatus.WAITING  # vLLM's check moved it on


def test_a_failed_compile_is_its_exception(patched):
    future: Future = Future()
    error = ValueError("no")
    future.set_exception(error)
    assert _request(future).grammar is error
