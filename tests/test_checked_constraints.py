"""The API server's memo of what it found of a request's constraint (dotllm.compiler.memo,
dotllm.vllm_ext.constraints.checked): asked again with equal params, the answer (or the
400) comes without the schema's checks."""

from __future__ import annotations

import pytest
from vllm.sampling_params import SamplingParams, StructuredOutputsParams

from dotllm.compiler import outlines_schema
from dotllm.compiler.memo import MISSING, Memo
from dotllm.compiler.spec import ConstraintError
from dotllm.settings import Settings
from dotllm.vllm_ext import constraints, request_validation, unenforced_report


def test_memo_keeps_the_most_recent_within_its_cost():
    memo = Memo(10)
    memo.put("a", 1, cost=4)
    memo.put("b", 2, cost=4)
    assert memo.get("a") == 1  # now the most recent
    memo.put("c", 3, cost=4)  # 12 > 10: the least recent ("b") goes
    assert (memo.get("a"), memo.get("b"), memo.get("c")) == (1, MISSING, 3)
    memo.put("a", 5, cost=2)  # replaced, its cost with it
    memo.put("d", 4, cost=4)
    assert (memo.get("a"), memo.get("c"), memo.get("d"), len(memo)) == (5, 3, 4, 3)
    memo.put("huge", 0, cost=11)  # over the whole bound: not kept, nothing dropped
    assert memo.get("huge") is MISSING and len(memo) == 3
    memo.put("none", None)
    assert memo.get("none") is None  # None is an answer, not a miss


@pytest.fixture
def rewritings(monkeypatch):
    """Counts the schema rewritings (one a check), with an empty memo."""
    calls = []
    normalize = outlines_schema.normalize
    monkeypatch.setattr(outlines_schema, "normalize",
                        lambda schema: calls.append(1) or normalize(schema))
    monkeypatch.setattr(constraints, "_checked", Memo(constraints.CHECKED_TEXT_BYTES))
    return calls


def _validate(params: StructuredOutputsParams) -> None:
    sampling = SamplingParams(max_tokens=8)
    sampling.structured_outputs = params
    request_validation._validate_structured_outputs(sampling, None, object(), object())


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string"}},
          "required": ["n"]}


def test_an_equal_request_is_answered_from_the_memo(rewritings):
    for _ in range(3):  # new params objects each time, as each request makes
        _validate(StructuredOutputsParams(json=dict(SCHEMA)))
    assert len(rewritings) == 1
    # Text or object, another key order (property order is part of the constraint),
    # another layout: each asked anew.
    _validate(StructuredOutputsParams(json=str(SCHEMA).replace("'", '"')))
    _validate(StructuredOutputsParams(json={"properties": SCHEMA["properties"],
                                            "type": "object", "required": ["n"]}))
    _validate(StructuredOutputsParams(json=dict(SCHEMA), disable_any_whitespace=True))
    assert len(rewritings) == 4


def test_a_refusal_is_remembered_and_raised_anew(rewritings, monkeypatch):
    from dotllm.compiler import metrics

    reasons = []
    monkeypatch.setattr(metrics, "count_refusal", reasons.append)
    bad = {"type": "object", "properties": {"n": {"type": "integr"}}}
    errors = []
    for _ in range(2):
        with pytest.raises(ValueError, match="Invalid structured output") as e:
            _validate(StructuredOutputsParams(json=dict(bad)))
        errors.append(e.value)
    assert str(errors[0]) == str(errors[1]) and errors[0] is not errors[1]
    assert reasons == ["invalid", "invalid"]  # every refused request counted
    assert len(rewritings) == 1


def test_other_settings_are_another_question(rewritings, monkeypatch):
    big = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(60)}}
    _validate(StructuredOutputsParams(json=big))
    monkeypatch.setenv("DOTLLM_MAX_SCHEMA_KIB", "1")
    assert Settings.from_environ().max_schema_kib == 1
    with pytest.raises(ValueError, match="--dotllm-max-schema-kib"):
        _validate(StructuredOutputsParams(json=big))


def test_the_served_schema_is_remembered_by_strictness(rewritings):
    relaxed = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}
    for _ in range(2):
        params, served = unenforced_report.serve_params(
            StructuredOutputsParams(json=dict(relaxed)), strict=False)
        assert "uniqueItems" not in str(params.json)
        assert [str(u) for u in served.unenforced] == ["uniqueItems at /properties/tags"]
    for _ in range(2):
        with pytest.raises(ValueError, match="strict JSON schema"):
            unenforced_report.serve_params(StructuredOutputsParams(json=dict(relaxed)),
                                           strict=True)
    assert len(rewritings) == 1  # (strict refuses before any rewriting)


def test_checked_does_not_keep_what_is_not_a_constraint_error(monkeypatch):
    monkeypatch.setattr(constraints, "_checked", Memo(constraints.CHECKED_TEXT_BYTES))
    params, settings = StructuredOutputsParams(regex="a+"), Settings()
    answers = iter([RuntimeError("a fault"), 7])

    def answer():
        if isinstance(value := next(answers), Exception):
            raise value
        return value

    with pytest.raises(RuntimeError):
        constraints.checked("q", params, settings, answer)
    assert constraints.checked("q", params, settings, answer) == 7
    assert constraints.checked("q", params, settings, answer) == 7  # (no third answer)


def test_a_remembered_refusal_keeps_its_reason(monkeypatch):
    monkeypatch.setattr(constraints, "_checked", Memo(constraints.CHECKED_TEXT_BYTES))
    params, settings = StructuredOutputsParams(regex="a+"), Settings()

    def refuse():
        raise ConstraintError("over a bound", "limit")

    for _ in range(2):
        with pytest.raises(ConstraintError, match="over a bound") as e:
            constraints.checked("q", params, settings, refuse)
        assert e.value.reason == "limit" and e.value.__context__ is None
