"""End to end: tool calls through `dotllm serve` on the embedded model, driven by `openai`.

The embedded model is served with vLLM's `mistral` tool parser by default (its chat
template writes Mistral's tool format). `tool_choice="required"` and a named function are
structured outputs: vLLM turns the tools into a JSON schema and DotLLM enforces it, so
the calls parse and their arguments validate against the function's parameters even from
random weights.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from dotllm.embedded_model import NAME
from tests.conftest import closing_bias

pytestmark = pytest.mark.server

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now.",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def client(dotllm_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=dotllm_server.base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def end_calls(tokenizer) -> dict[str, int]:
    """logit_bias towards closing strings, objects and the list of calls: random weights
    would otherwise write calls until max_tokens (the constraint still decides what is
    possible at all)."""
    return closing_bias(tokenizer, ('"', '",', '"}', "}", "}]", "]"), 40)


def assert_valid_calls(calls, names=tuple(PARAMETERS)) -> None:
    assert calls, "no tool call"
    for call in calls:
        assert call.type == "function" and call.id
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def test_tool_choice_required_answers_valid_calls(client, end_calls):
    reply = client.chat.completions.create(
        model=NAME, messages=MESSAGES, tools=TOOLS, tool_choice="required",
        max_tokens=300, logit_bias=end_calls)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert_valid_calls(choice.message.tool_calls)


def test_a_named_function_is_the_one_called(client, end_calls):
    reply = client.chat.completions.create(
        model=NAME, messages=MESSAGES, tools=TOOLS, max_tokens=200, logit_bias=end_calls,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    choice = reply.choices[0]
    assert_valid_calls(choice.message.tool_calls, names=("get_time",))
    assert len(choice.message.tool_calls) == 1


@pytest.mark.parametrize("tool_choice", ["required", {
    "type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_calls_assemble_into_valid_calls(client, end_calls, tool_choice):
    stream = client.chat.completions.create(
        model=NAME, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice,
        max_tokens=300, logit_bias=end_calls, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for part in delta.tool_calls or ():
            call = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or part.id
            if part.function is not None:
                call["name"] += part.function.name or ""
                call["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert calls and finish in ("tool_calls", "stop"), (calls, finish)
    for call in calls.values():
        assert call["id"] and call["name"] in PARAMETERS, call
        jsonschema.validate(json.loads(call["arguments"]), PARAMETERS[call["name"]])


def test_auto_tool_choice_is_served_with_the_tools_in_the_prompt(client):
    """Random weights decide whether to call: what is checked is that auto is accepted and
    the chat template puts the tools before the question."""
    plain = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4)
    auto = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4,
                                          tools=TOOLS, tool_choice="auto")
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 20
    assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_a_conversation_with_a_tool_result_goes_on(client, end_calls):
    first = client.chat.completions.create(
        model=NAME, messages=MESSAGES, tools=TOOLS, max_tokens=200, logit_bias=end_calls,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    messages = [*MESSAGES,
                {"role": "assistant", "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": "12 degrees, rain"}]
    second = client.chat.completions.create(model=NAME, messages=messages, tools=TOOLS,
                                            max_tokens=4)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
