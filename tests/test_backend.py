"""DotLLM's vLLM backend adapter, in process: vLLM's (type, text) keys, grammar methods."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch
from vllm.v1.structured_output.backend_types import StructuredOutputOptions

from dotllm.compiler.spec import ConstraintError, ConstraintSpec
from dotllm.guide import Guide
from dotllm.llguidance_guide import LLGuidanceGuide
from dotllm.settings import Settings


def test_choice_key_compiles_and_guides(backend, tokenizer):
    grammar = backend.compile_grammar(StructuredOutputOptions.CHOICE, '["yes", "no"]')
    bitmask = backend.allocate_token_bitmask(4)
    assert bitmask.shape == (4, backend.vocab_size // 32) and (bitmask == -1).all()
    grammar.fill_bitmask(bitmask, 2)
    row = bitmask[2].numpy()
    allowed = [t for t in range(backend.vocab_size) if (int(row[t >> 5]) >> (t & 31)) & 1]
    texts = {tokenizer.decode([t]) for t in allowed}
    assert {"yes", "no"} <= texts  # whole-word tokens, and only prefixes of the choices
    assert all("yes".startswith(text) or "no".startswith(text) for text in texts), texts
    assert (bitmask[1].numpy() == -1).all()  # other rows untouched
    yes = tokenizer.encode("yes", add_special_tokens=False)
    assert grammar.validate_tokens(yes) == yes
    assert grammar.accept_tokens("r1", yes)
    assert grammar.accept_tokens("r1", [tokenizer.eos_token_id])
    assert grammar.is_terminated()
    grammar.rollback(1)
    assert not grammar.is_terminated()
    grammar.reset()
    assert np.array_equal(bitmask[2].numpy(), row)


@pytest.mark.parametrize(
    ("kind", "text"),
    [(StructuredOutputOptions.JSON, '{"type": "object", "properties": {"a": {"type": "integer"}}}'),
     (StructuredOutputOptions.JSON_OBJECT, ""),
     (StructuredOutputOptions.REGEX, "[0-9]{2}")],
)
def test_every_supported_key_compiles(backend, kind, text):
    assert not backend.compile_grammar(kind, text).is_terminated()


@pytest.mark.parametrize(("kind", "text", "output"), [
    (StructuredOutputOptions.GRAMMAR, 'start: "x" ("y" | "z")+', "xyzy"),
    (StructuredOutputOptions.JSON, '{"type": "number", "maximum": 20}', "17"),
])
def test_what_outlines_core_cannot_runs_on_llguidance(backend, tokenizer, kind, text, output):
    grammar = backend.compile_grammar(kind, text)
    assert isinstance(grammar.guide, LLGuidanceGuide)
    tokens = tokenizer.encode(output, add_special_tokens=False)
    assert grammar.validate_tokens(tokens) == tokens
    assert grammar.accept_tokens("r", tokens)
    bitmask = backend.allocate_token_bitmask(2)
    grammar.fill_bitmask(bitmask, 1)
    assert bitmask[1].numpy().any() and not bitmask[1].numpy().all()
    grammar.rollback(len(tokens))
    assert grammar.guide.validate_tokens(tokens) == tokens


def test_structural_tags_run_on_llguidance(backend, tokenizer):
    grammar = backend.compile_grammar(StructuredOutputOptions.STRUCTURAL_TAG, json.dumps(
        {"triggers": ["<f="], "structures": [
            {"begin": "<f=a>", "schema": {"type": "integer"}, "end": "</f>"}]}))
    assert isinstance(grammar.guide, LLGuidanceGuide)
    assert grammar.accept_tokens("r", tokenizer.encode("so <f=a>12</f>", add_special_tokens=False))
    with pytest.raises(ConstraintError, match="structural_tag `structures` must be"):
        backend.compile_grammar(StructuredOutputOptions.STRUCTURAL_TAG, '{"structures": []}')


def test_what_neither_engine_serves_names_both_reasons(backend):
    with pytest.raises(ConstraintError, match="no engine here enforces: if at /, then at /"):
        backend.compile_grammar(StructuredOutputOptions.JSON, json.dumps(
            {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}))
    with pytest.raises(ConstraintError, match="exactly: oneOf at /: branches 0 and 1 may "
                                              "both match; llguidance cannot either"):
        backend.compile_grammar(StructuredOutputOptions.JSON, json.dumps(
            {"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 3}]}))


def _corrupt_regex_index(vocabulary, regex: str):
    from dotllm.compiler.compiled import CompiledIndex

    compiled = CompiledIndex.build(regex, vocabulary)
    data = bytearray(compiled.to_bytes())
    data[-3] ^= 0xFF  # the last mask row: not the initial state's
    loaded = CompiledIndex.from_buffer(bytes(data))
    assert int(loaded.table.state_rows[loaded.initial_state]) != len(loaded.table.rows) - 1
    return loaded


def test_a_corrupt_block_hands_the_request_to_llguidance(backend, tokenizer, vocabulary):
    """A cached index found corrupt mid-request is the server's fault: llguidance takes
    over with the tokens so far, and the request is served, not failed."""
    from dotllm.tiers import IndexWithFallback
    from dotllm.vllm_ext.backend import DotllmGrammar

    spec = ConstraintSpec.regex("[0-9]{3}")
    outcomes = []
    guide = IndexWithFallback(Guide(_corrupt_regex_index(vocabulary, "[0-9]{3}"),
                                    vocabulary.eos_token_id),
                              lambda: backend.llguidance_guide(spec), outcomes.append)
    grammar = DotllmGrammar(guide, vocabulary.eos_token_id)
    row = torch.zeros((1, (vocabulary.size + 31) // 32), dtype=torch.int32)
    for token in tokenizer.encode("123", add_special_tokens=False):
        grammar.fill_bitmask(row, 0)  # a later state's row is the corrupt one
        assert grammar.accept_tokens("req-1", [token])
    assert grammar.accept_tokens("req-1", [vocabulary.eos_token_id])
    assert grammar.is_terminated() and outcomes == ["corrupt"]
    assert guide.tier == "llguidance"


def test_a_corrupt_block_llguidance_cannot_take_over_is_a_server_fault(tokenizer, vocabulary):
    """Then the request ends as the server's fault (a 503 that says to retry), never a 400."""
    from dotllm.tiers import IndexWithFallback
    from dotllm.vllm_ext import compile_errors
    from dotllm.vllm_ext.backend import DotllmGrammar

    def no_llguidance():
        raise ConstraintError("llguidance cannot either: for this test")

    guide = IndexWithFallback(Guide(_corrupt_regex_index(vocabulary, "[0-9]{3}"),
                                    vocabulary.eos_token_id), no_llguidance, lambda _: None)
    grammar = DotllmGrammar(guide, vocabulary.eos_token_id)
    tokens = tokenizer.encode("123", add_special_tokens=False) + [vocabulary.eos_token_id]
    assert grammar.validate_tokens(tokens) == []
    assert not grammar.accept_tokens("req-2", tokens)
    reason = compile_errors._take("req-2")
    assert reason.startswith(compile_errors.SERVER_FAULT) and "retry" in reason


def test_a_recorded_failure_reaches_its_error_output_only(monkeypatch):
    """The scheduler's step outputs: the failed request's error output carries its reason,
    no other output is touched; an entry no request collects goes once stale."""
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason

    from dotllm.vllm_ext import compile_errors

    compile_errors.record("failed", "no such pattern")
    compile_errors.record("aborted", "never built")
    outputs = {0: EngineCoreOutputs(outputs=[
        EngineCoreOutput("running", [7]),
        EngineCoreOutput("done", [2], finish_reason=FinishReason.STOP),
        EngineCoreOutput("failed", [], finish_reason=FinishReason.ERROR)])}
    compile_errors.fill_stop_reasons(outputs, FinishReason.ERROR, known={"aborted"})
    running, done, failed = outputs[0].outputs
    assert failed.stop_reason == f"{compile_errors.MARKER}invalid: no such pattern"
    assert running.stop_reason is None and done.stop_reason is None
    assert list(compile_errors._failures) == ["aborted"]  # known, or not yet stale
    monkeypatch.setattr(compile_errors, "STALE_S", -1.0)
    compile_errors.fill_stop_reasons(outputs, FinishReason.ERROR, known={"aborted"})
    assert list(compile_errors._failures) == ["aborted"]  # the scheduler still has it
    compile_errors.fill_stop_reasons({}, FinishReason.ERROR, known=set())
    assert not compile_errors._failures


@pytest.mark.parametrize("engine", ["outlines", "llguidance"])
def test_one_engine_alone(backend, tokenizer, monkeypatch, engine):
    """`--dotllm-constraint-engine`: outlines waits for each index and refuses what
    outlines-core cannot serve; llguidance never compiles."""

    monkeypatch.setattr(backend, "settings", Settings(constraint_engine=engine))
    compiles = backend.metrics.compiles._value.get()
    grammar = backend.compile_grammar(StructuredOutputOptions.REGEX, f"[0-9]{{3}}{engine}")
    assert grammar.guide.tier == ("index" if engine == "outlines" else "llguidance")
    tokens = tokenizer.encode(f"123{engine}", add_special_tokens=False)
    assert grammar.accept_tokens("r", tokens + [tokenizer.eos_token_id])
    keywords = '{"type": "number", "maximum": 20}'
    if engine == "outlines":
        with pytest.raises(ConstraintError, match="exactly: maximum at /"):
            backend.compile_grammar(StructuredOutputOptions.JSON, keywords)
    else:
        grammar = backend.compile_grammar(StructuredOutputOptions.JSON, keywords)
        assert isinstance(grammar.guide, LLGuidanceGuide)
    assert backend.metrics.compiles._value.get() - compiles == (engine == "outlines")


def test_tokens_are_counted_by_tier_in_batches(backend, tokenizer):
    """Every request's tokens reach dotllm_constraint_tier_tokens_total{tier}, not one
    metric write a token: at the end of the request, or when its grammar goes."""
    def counted(tier):
        return backend.metrics.tier_tokens.labels(tier=tier)._value.get()

    yes = tokenizer.encode("yes", add_special_tokens=False)
    backend.manager.get(ConstraintSpec.choice(["yes", "no"])).result(timeout=120)  # cached
    gc.collect()  # other tests' grammars report their tokens when they go: before, not during
    index_before, ll_before = counted("index"), counted("llguidance")
    grammar = backend.compile_grammar(StructuredOutputOptions.CHOICE, '["yes", "no"]')
    assert grammar.guide.tier == "index"
    assert grammar.accept_tokens("r", yes)
    assert counted("index") == index_before  # not yet
    assert grammar.accept_tokens("r", [tokenizer.eos_token_id])
    assert counted("index") == index_before + len(yes) + 1
    grammar = backend.compile_grammar(StructuredOutputOptions.GRAMMAR, 'start: "yes" | "no"')
    assert grammar.accept_tokens("r", yes)
    del grammar  # cut short: max_tokens, or aborted
    assert counted("llguidance") == ll_before + len(yes)


def _uncompiled_regex() -> str:
    """A regex no test compiled before (a compile of its own, well over the warm lookup)."""
    import uuid

    return f"[a-z]{{40}}x{uuid.uuid4().hex[:8]}[0-9]{{30}}"


def _prefill_waits(backend, outcome: str) -> float:
    return backend.metrics.prefill_waits.labels(outcome=outcome)._value.get()


def test_a_tiered_request_that_waits_behind_its_prefill_starts_on_its_index(backend):
    """The prompt's prefill outlasted the compile: no llguidance, no hand-over."""
    before = _prefill_waits(backend, "index")
    waited = []
    grammar = backend.compile_spec(
        ConstraintSpec.regex(_uncompiled_regex()),
        behind_prefill=lambda index: waited.append(index.result(timeout=120)))
    assert waited and grammar.guide.tier == "index"
    assert _prefill_waits(backend, "index") == before + 1


def test_a_prefill_that_ends_first_starts_the_request_on_llguidance(backend):
    """The sampling step came before the index: llguidance serves it, the index takes
    over when it comes, as when the prompt was short."""
    before = _prefill_waits(backend, "llguidance")
    grammar = backend.compile_spec(ConstraintSpec.regex(_uncompiled_regex()),
                                   behind_prefill=lambda index: None)
    assert grammar.guide.tier == "llguidance"
    assert _prefill_waits(backend, "llguidance") == before + 1
