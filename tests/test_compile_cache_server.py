"""End to end: compile metrics on /metrics, and a restarted server compiling nothing."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from dotllm.embedded_model import NAME
from tests.conftest import start_dotllm, stop_server

pytestmark = pytest.mark.server

SCHEMA = {"type": "object",
          "properties": {"restart_check": {"type": "boolean"}, "n": {"type": "integer"}},
          "required": ["restart_check", "n"]}


def ask(server, schema=SCHEMA) -> str:
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    reply = client.completions.create(
        model=NAME, prompt="x", max_tokens=60, seed=0,
        extra_body={"structured_outputs": {"json": schema}})
    jsonschema.validate(json.loads(reply.choices[0].text), schema)
    return reply.choices[0].text


def test_metrics_count_compiles_hits_and_failures(dotllm_server):
    before = dotllm_server.metrics()
    schema = {"type": "object", "properties": {"metrics_check": {"type": "boolean"}},
              "required": ["metrics_check"]}
    ask(dotllm_server, schema)  # starts on llguidance while the index compiles
    dotllm_server.wait_for_metric("dotllm_constraint_compile_seconds_count",
                                  before.get("dotllm_constraint_compile_seconds_count", 0) + 1)
    ask(dotllm_server, schema)  # the index, from memory
    client = openai.OpenAI(base_url=dotllm_server.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="x", max_tokens=2,
                                  extra_body={"structured_outputs": {"regex": r"m\p{Nope}"}})
    after = dotllm_server.metrics()

    def delta(name):
        return after.get(name, 0) - before.get(name, 0)

    assert delta("dotllm_constraint_requests_total") == 3
    assert delta("dotllm_constraint_compiles_total") == 2
    assert delta('dotllm_constraint_cache_hits_total{level="memory"}') == 1
    assert delta('dotllm_constraint_failures_total{reason="invalid"}') == 1
    assert delta('dotllm_constraint_refusals_total{reason="invalid"}') == 1
    assert delta("dotllm_constraint_compile_seconds_count") == 1  # failures are not timed
    assert "dotllm_constraint_pool_queue_length" in after
    assert after['dotllm_constraint_cache_bytes{level="memory"}'] > 0
    assert after['dotllm_constraint_cache_bytes{level="disk"}'] > 0
    log = dotllm_server.log.read_text()
    assert re.search(r"compile [0-9a-f]{12}: done in [0-9.]+ s \(\d+ states", log)
    assert re.search(r"index cache: memory 1024 MiB, disk \S+ \(4096 MiB\)", log)
    # Every constrained step's row went through DotLLM's kernel (torch's, on CPU): the
    # request that started on llguidance sent its rows, the one on the index named rows
    # of its table, which the worker holds.
    assert delta('dotllm_mask_rows_total{kernel="torch",source="step"}') >= 1
    assert delta('dotllm_mask_rows_total{kernel="torch",source="table"}') >= 2
    assert "DotLLM applies grammar bitmasks with its torch kernel (V1 model runner)" in log
    assert any(name.startswith("vllm:generation_tokens_total") for name in after)


def test_every_refused_request_is_counted_by_its_reason(dotllm_server):
    """Refusals answered before any engine work count as much as compile failures, and
    every request counts, not each constraint once."""
    client = openai.OpenAI(base_url=dotllm_server.base_url, api_key="x", max_retries=0)
    def nested(levels: int) -> dict:
        schema: dict = {"type": "array"}
        for _ in range(levels):
            schema = {"type": "array", "items": schema}
        return schema
    strict = {"type": "json_schema", "json_schema": {"name": "s", "strict": True, "schema": {
        "type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}
    asks = {"invalid": [{"structured_outputs": {"json": {"type": 5}}}] * 3
            + [{"structured_outputs": {"regex": "(unclosed"}}] * 2,
            # past --dotllm-max-schema-depth (100): in the schema's check, in the body's
            "limit": [{"structured_outputs": {"json": nested(levels)}} for levels in (103, 150)],
            "strict": [{"response_format": strict}] * 2}
    before = dotllm_server.metrics()
    for bodies in asks.values():
        for body in bodies:
            with pytest.raises(openai.BadRequestError):
                client.chat.completions.create(
                    model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                    **({"response_format": body["response_format"]} if "response_format"
                       in body else {"extra_body": body}))
    after = dotllm_server.metrics()
    for reason, bodies in asks.items():
        name = f'dotllm_constraint_refusals_total{{reason="{reason}"}}'
        assert after.get(name, 0) - before.get(name, 0) == len(bodies), reason


def test_restarted_server_serves_cached_schemas_without_compiling(
        dotllm_server, tmp_path_factory):
    compiled = dotllm_server.metrics().get("dotllm_constraint_compile_seconds_count", 0)
    ask(dotllm_server)
    dotllm_server.wait_for_metric("dotllm_constraint_compile_seconds_count", compiled + 1)
    first = ask(dotllm_server)  # on the index, as the restarted server will be
    restarted = start_dotllm(tmp_path_factory, index_cache_dir=dotllm_server.index_cache_dir)
    try:
        assert ask(restarted) == first  # same index, same seed: same output
        metrics = restarted.metrics()
        assert metrics.get("dotllm_constraint_compiles_total") == 0
        assert metrics.get('dotllm_constraint_cache_hits_total{level="disk"}') == 1
    finally:
        stop_server(restarted)
