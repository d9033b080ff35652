"""End to end: structured outputs through a real `dotllm serve`, driven by `openai`.

The embedded model has random weights, so inside a free-text string it almost never
picks a closing quote. Where a schema has unbounded strings, the tests bias the quote
tokens upwards (`logit_bias`): the constraint still decides which tokens are possible at
all (a biased token the constraint forbids stays impossible), so the output must still
match.
"""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import openai
import pytest

from dotllm.embedded_model import NAME

pytestmark = pytest.mark.server

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "member": {"type": "boolean"},
        "tier": {"enum": ["gold", "silver", "bronze"]},
    },
    "required": ["name", "age", "member", "tier"],
}


@pytest.fixture(scope="module")
def client(dotllm_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=dotllm_server.base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def close_strings(tokenizer) -> dict[str, int]:
    """logit_bias that makes the model end strings and objects as soon as it may."""
    ids = {tokenizer.encode(s, add_special_tokens=False)[0] for s in ['"', '",', '"}', "}"]}
    return {str(i): 60 for i in ids}


def chat(client, schema_format: dict, **kwargs):
    reply = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Reply in JSON."}],
        max_tokens=kwargs.pop("max_tokens", 120),
        response_format=schema_format,
        **kwargs,
    )
    return reply.choices[0]


def is_person(text: str) -> bool:
    jsonschema.validate(json.loads(text), PERSON)
    return True


def is_compact_person(text: str) -> bool:
    return is_person(text) and text == json.dumps(
        json.loads(text), separators=(",", ":"), ensure_ascii=False)


def test_json_schema_chat_output_validates(client):
    choice = chat(client, {"type": "json_schema",
                           "json_schema": {"name": "person", "schema": PERSON}}, seed=1)
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_schema_with_free_strings(client, close_strings):
    schema = {"type": "object",
              "properties": {"title": {"type": "string"}, "tags": {
                  "type": "array", "items": {"type": "string"}, "maxItems": 3}},
              "required": ["title", "tags"]}
    choice = chat(client, {"type": "json_schema", "json_schema": {"name": "doc", "schema": schema}},
                  logit_bias=close_strings)
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_parses(client, close_strings):
    choice = chat(client, {"type": "json_object"}, logit_bias=close_strings)
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content), dict)


def test_json_schema_streaming(client):
    stream = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "JSON please"}], max_tokens=120,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
        stream=True, seed=7,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_structured_outputs_json_on_completions(client):
    reply = client.completions.create(
        model=NAME, prompt="Person:", max_tokens=120, seed=3,
        extra_body={"structured_outputs": {"json": PERSON}},
    )
    jsonschema.validate(json.loads(reply.choices[0].text), PERSON)


@pytest.mark.parametrize("pattern", [r"\d{3}-[a-z]{2,4}", r"(yes|no), because [A-Z]{3}\.",
                                     r"[0-9a-f]{8}"])
def test_regex_output_fully_matches(client, pattern):
    reply = client.completions.create(
        model=NAME, prompt="Code:", max_tokens=30,
        extra_body={"structured_outputs": {"regex": pattern}},
    )
    assert reply.choices[0].finish_reason == "stop"
    assert re.fullmatch(pattern, reply.choices[0].text), reply.choices[0].text


def test_choice_output_is_one_of_the_choices(client):
    choices = ["positive", "negative", "neutral ☺"]
    for seed in range(4):
        reply = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "Sentiment?"}], max_tokens=10,
            seed=seed, extra_body={"structured_outputs": {"choice": choices}},
        )
        assert reply.choices[0].message.content in choices


def test_whitespace_pattern_is_honoured(client):
    reply = client.completions.create(
        model=NAME, prompt="x", max_tokens=120, seed=5,
        extra_body={"structured_outputs": {"json": PERSON, "whitespace_pattern": ""}},
    )
    assert is_compact_person(reply.choices[0].text)


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        ({"guided_json": PERSON}, is_person),
        ({"guided_json": json.dumps(PERSON)}, is_person),
        ({"guided_regex": r"[A-Z]{2}\d"}, lambda t: re.fullmatch(r"[A-Z]{2}\d", t)),
        ({"guided_choice": ["left", "right"]}, lambda t: t in ("left", "right")),
        ({"guided_json": PERSON, "guided_whitespace_pattern": ""}, is_compact_person),
    ],
)
def test_legacy_guided_fields_are_honoured(client, extra, check):
    reply = client.completions.create(model=NAME, prompt="x", max_tokens=120, seed=11,
                                      extra_body=extra)
    assert check(reply.choices[0].text), reply.choices[0].text


def test_twenty_concurrent_requests_with_different_schemas(dotllm_server):
    schemas = [
        {"type": "object",
         "properties": {f"field_{i}": {"type": "integer"}, "ok": {"type": "boolean"}},
         "required": [f"field_{i}", "ok"]}
        for i in range(20)
    ]

    async def run():
        client = openai.AsyncOpenAI(base_url=dotllm_server.base_url, api_key="x", max_retries=0)
        try:
            return await asyncio.gather(*[
                client.chat.completions.create(
                    model=NAME, messages=[{"role": "user", "content": f"item {i}"}],
                    max_tokens=60, seed=i,
                    response_format={"type": "json_schema",
                                     "json_schema": {"name": f"s{i}", "schema": s}})
                for i, s in enumerate(schemas)
            ])
        finally:
            await client.close()

    replies = asyncio.run(run())
    for schema, reply in zip(schemas, replies, strict=True):
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"structured_outputs": {"regex": "(unclosed"}}, "invalid regex"),
        ({"structured_outputs": {"choice": []}}, "empty"),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
         "Unsupported type: foo"),
        ({"structured_outputs": {"json": "{not json"}}, "not valid JSON"),
        ({"structured_outputs": {"grammar": "root ::= 'a'"}}, "grammar constraints"),
        ({"structured_outputs": {"json": {"type": "integer", "maximum": 9}}},
         "cannot enforce yet: maximum at /"),
        ({"guided_json": PERSON, "guided_regex": "a"}, "guided_json, guided_regex"),
        ({"guided_regex": "a", "structured_outputs": {"regex": "b"}}, "not both"),
    ],
)
def test_bad_constraints_are_400s_naming_the_problem(client, extra, message):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=NAME, prompt="x", max_tokens=5, extra_body=extra)
    assert message in info.value.message
    assert client.completions.create(model=NAME, prompt="x", max_tokens=2).choices


@pytest.mark.parametrize(
    ("regex", "message"),
    [
        pytest.param("[ab]*a[ab]{22}", "took longer than", id="compile-timeout"),
        pytest.param("a(?=b)", "cannot compile", id="outlines-core-rejects"),
    ],
)
def test_constraint_failing_in_the_engine_is_a_400(client, regex, message):
    """Only compiling tells: the engine's error reaches the client as a 400 with its reason."""
    for attempt in range(2):  # the second time the failure is remembered
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=NAME, prompt="x", max_tokens=5,
                                      extra_body={"structured_outputs": {"regex": regex}})
        assert message in info.value.message, (attempt, info.value.message)
    reply = client.completions.create(model=NAME, prompt="x", max_tokens=5,
                                      extra_body={"structured_outputs": {"regex": "[xy]{3}"}})
    assert re.fullmatch("[xy]{3}", reply.choices[0].text)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_engine_failure_in_a_stream_is_reported_in_the_stream(client, endpoint):
    """Stock vLLM ends such a stream with no chunk and no error, as if it succeeded."""
    extra = {"structured_outputs": {"regex": f"{endpoint}(?=c)"}}
    if endpoint == "chat":
        stream = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=5,
            stream=True, extra_body=extra)
    else:
        stream = client.completions.create(model=NAME, prompt="x", max_tokens=5, stream=True,
                                           extra_body=extra)
    with pytest.raises(openai.APIError, match="cannot compile"):
        list(stream)


def test_schema_that_explodes_into_a_huge_regex_does_not_stall_the_server(dotllm_server,
                                                                         client):
    """This schema becomes a 4 MB regex whose index takes outlines-core long to build,
    holding the GIL: only a compile worker may do that, never the API server or engine."""
    import threading
    import time

    import requests

    branch = [{"type": "object", "properties": {f"k{i}_{j}": {"type": "string"}
                                                for j in range(30)}} for i in range(30)]
    schema = {"anyOf": [{"anyOf": branch}] * 4}
    outcome = {}

    def send():
        try:
            client.completions.create(model=NAME, prompt="x", max_tokens=5,
                                      extra_body={"structured_outputs": {"json": schema}})
            outcome["status"] = 200
        except openai.APIStatusError as e:
            outcome["status"] = e.status_code

    request = threading.Thread(target=send)
    request.start()
    slowest = 0.0
    while request.is_alive():
        started = time.monotonic()
        assert requests.get(dotllm_server.url + "/health", timeout=10).status_code == 200
        reply = client.completions.create(model=NAME, prompt="x", max_tokens=2)
        assert reply.choices
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.5)
    request.join()
    print(f"exploding schema: HTTP {outcome.get('status')}, slowest round {slowest:.1f} s")
    assert outcome.get("status") in (200, 400)  # compiled, or over the compile timeout
    # Building it in the API server or the engine stalled them for over a minute. A round
    # may still be slow on 2 cores while the worker compiles, so the bound is loose.
    assert slowest < 15, slowest
