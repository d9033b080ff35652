"""structural_tag constraints: both request forms, read by llguidance as DotLLM writes them."""

from __future__ import annotations

import llguidance
import llguidance.hf
import pytest

from dotllm.compiler import llguidance_grammar
from dotllm.compiler.spec import ConstraintError, ConstraintSpec

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
LEGACY = {"type": "structural_tag", "triggers": ["<function="],
          "structures": [{"begin": "<function=get_weather>", "schema": WEATHER,
                          "end": "</function>"}]}


@pytest.fixture(scope="module")
def ll_tokenizer(tokenizer):
    return llguidance.hf.from_tokenizer(tokenizer, len(tokenizer))


@pytest.fixture
def accepts(tokenizer, ll_tokenizer):
    def accepts(payload: dict, text: str) -> bool:
        grammar = llguidance_grammar.grammar_for(ConstraintSpec.structural_tag(payload))
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
        assert not matcher.is_error(), matcher.get_error()
        tokens = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        return all(matcher.consume_token(t) for t in tokens)
    return accepts


@pytest.mark.parametrize(("text", "ok"), [
    ('Hi <function=get_weather>{"city": "Paris"}</function> and '
     '<function=get_weather>{"city": "Rome"}</function> done', True),
    ("no call at all", True),
    ('<function=get_weather>{"city": "Paris", "units": "C"}</function>', False),  # closed
    ('<function=get_weather>{"town": "Paris"}</function>', False),
    ('<function=get_weather>{"city":"Paris"}</function>', False),  # separators as for JSON
])
def test_legacy_form_is_text_with_triggered_structures(accepts, text, ok):
    assert accepts(LEGACY, text) is ok


THINK_THEN_ONE_CALL = {"type": "structural_tag", "format": {"type": "sequence", "elements": [
    {"type": "tag", "begin": "<think>", "content": {"type": "any_text"}, "end": "</think>"},
    {"type": "triggered_tags", "triggers": ["<tool"], "at_least_one": True,
     "stop_after_first": True,
     "tags": [{"type": "tag", "begin": "<tool>", "end": ["</tool>", "</t>"],
               "content": {"type": "json_schema", "json_schema": WEATHER}}]}]}}


@pytest.mark.parametrize(("text", "ok"), [
    ('<think>a "quoted" </thin\nthought</think>ok <tool>{"city": "Oslo"}</t>', True),
    ('<think>x</think><tool>{"city": "Oslo"}</tool>', True),
    ("<think>x</think>no call", False),  # at_least_one
    ('<think>x</think><tool>{"city": "Oslo"}</tool> more', False),  # stop_after_first
    ('<tool>{"city": "Oslo"}</tool>', False),
])
def test_format_form_sequence_tags_and_triggers(accepts, text, ok):
    assert accepts(THINK_THEN_ONE_CALL, text) is ok


@pytest.mark.parametrize(("fmt", "text", "ok"), [
    ({"type": "tags_with_separator", "separator": ",", "tags": [
        {"type": "tag", "begin": "<n>", "end": "</n>",
         "content": {"type": "regex", "pattern": "[0-9]+/[0-9]+"}}]},
     "<n>1/2</n>,<n>3/4</n>", True),
    ({"type": "tags_with_separator", "separator": ",", "tags": [
        {"type": "tag", "begin": "<n>", "end": "</n>",
         "content": {"type": "const_string", "value": "1"}}]}, "", True),
    ({"type": "repeat", "min": 2, "max": 3, "content": {"type": "const_string", "value": "ab"}},
     "ababab", True),
    ({"type": "repeat", "min": 2, "max": 3, "content": {"type": "const_string", "value": "ab"}},
     "ab", False),
    ({"type": "or", "elements": [{"type": "const_string", "value": "yes"},
                                 {"type": "json_schema", "json_schema": {"type": "integer"}}]},
     "42", True),
    ({"type": "sequence", "elements": [{"type": "optional", "content": {
        "type": "const_string", "value": "A"}}, {"type": "plus", "content": {
            "type": "const_string", "value": "b"}}]}, "bbb", True),
])
def test_format_form_combinators(accepts, fmt, text, ok):
    assert accepts({"type": "structural_tag", "format": fmt}, text) is ok


@pytest.mark.parametrize(("payload", "message"), [
    ({"format": {"type": "token", "token": 1}}, "format 'token' is not supported by DotLLM"),
    ({"format": {"type": "any_text", "excludes": ["x"]}}, 'option excludes=["x"]'),
    ({"format": {"type": "json_schema", "json_schema": {}, "style": "qwen_xml"}},
     'style="qwen_xml"'),
    ({"format": {"type": "sequence", "elements": [{"type": "any_text"},
                                                  {"type": "const_string", "value": "x"}]}},
     "any_text is supported only as a tag's content or last"),
    ({"triggers": ["<y"], "structures": [{"begin": "<x>", "schema": {}, "end": "</x>"}]},
     "'<x>' starts with none of the triggers"),
    ({"triggers": ["<x"], "structures": []}, "`structures` must be a non-empty list"),
    ({"type": "structural_tag"}, "needs `format`, or `structures` and `triggers`"),
])
def test_what_cannot_be_served_is_named(payload, message):
    spec = ConstraintSpec.structural_tag(payload)
    with pytest.raises(ConstraintError) as info:
        llguidance_grammar.check(spec, spec.outlines_refusal())
    assert str(info.value).startswith("outlines-core does not compile structural tags; ")
    assert message in str(info.value)


def test_spellings_of_one_payload_share_a_key():
    a = ConstraintSpec.structural_tag(LEGACY)
    b = ConstraintSpec.structural_tag(dict(reversed(list(LEGACY.items()))))
    assert a.key == b.key and a.outlines_refusal_reason == "structural_tag"
    with pytest.raises(ConstraintError, match="not valid JSON"):
        ConstraintSpec.structural_tag("{")
