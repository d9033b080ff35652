"""End to end on a CUDA GPU: `dotllm serve` masks logits with DotLLM's CUDA kernel in
both of vLLM's model runners, and constrained outputs stay valid.

Run there with `bash bench/gpu_serving.sh` (stages vLLM first: ../shared/gpu/README.md).
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from dotllm.embedded_model import NAME
from tests.conftest import start_dotllm, stop_server

pytestmark = [pytest.mark.gpu, pytest.mark.server]

SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "n": {"type": "integer", "minimum": 0, "maximum": 999}},
     "required": ["ok", "n"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
     "required": ["color"]},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 4},
]


def _mixed_batch(client: openai.OpenAI) -> None:
    """64 requests, 16 at a time, a quarter of them unconstrained (in the same batches);
    every constrained answer complete and valid (the schemas bound every document's length
    well under max_tokens: an unbounded integer once ran past it)."""
    def ask(i: int) -> None:
        if i % 4 == 3:
            client.completions.create(model=NAME, prompt=f"free {i}", max_tokens=40)
            return
        schema = SCHEMAS[i % len(SCHEMAS)]
        reply = client.completions.create(
            model=NAME, prompt=f"request {i}", max_tokens=80, seed=i,
            extra_body={"structured_outputs": {"json": schema}})
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.text
        jsonschema.validate(json.loads(choice.text), schema)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(ask, range(64)))


@pytest.mark.parametrize("runner", ["v2", "v1"])
def test_constrained_requests_use_the_cuda_kernel(runner, embedded_model, tmp_path_factory):
    env = {**os.environ, "VLLM_USE_V2_MODEL_RUNNER": "1" if runner == "v2" else "0",
           "VLLM_USE_FLASHINFER_SAMPLER": "0"}
    server = start_dotllm(tmp_path_factory, env=env)
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        _mixed_batch(client)
        reply = client.completions.create(
            model=NAME, prompt="x", max_tokens=12,
            extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}})
        assert re.fullmatch("[0-9]{3}-[a-z]{2}", reply.choices[0].text)
        rows = server.total("dotllm_mask_rows_total", kernel="cuda")
        assert rows >= 48, server.log_tail()
        assert (f"DotLLM applies grammar bitmasks with its cuda kernel ({runner.upper()} model "
                "runner)") in server.log.read_text()
    finally:
        stop_server(server)


@pytest.mark.parametrize("runner", ["v2", "v1"])
def test_device_states_sample_without_waiting_for_the_host(runner, embedded_model,
                                                          tmp_path_factory):
    """--dotllm-device-states-mib with vLLM's async scheduling (on by default on a GPU):
    requests on their index are masked from device states, and steps sample without the
    host's accept of the last one; every answer valid."""
    env = {**os.environ, "VLLM_USE_V2_MODEL_RUNNER": "1" if runner == "v2" else "0",
           "VLLM_USE_FLASHINFER_SAMPLER": "0"}
    server = start_dotllm(tmp_path_factory, env=env, extra_args=(
        "--dotllm-device-states-mib", "64", "--dotllm-constraint-engine", "outlines"))
    try:
        _mixed_batch(openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0))
        state_rows = server.total("dotllm_mask_rows_total", source="state")
        undeferred = server.total("dotllm_steps_sampled_without_host_total")
        assert state_rows >= 48 and undeferred > 0, server.log_tail()
    finally:
        stop_server(server)


# llguidance serves grammars (outlines-core compiles none): letters, as many as the
# request's min_tokens and max_tokens make them, LETTER_STEPS steps. They outlast the batch's
# arrival: on an H100 the API server let the 22 other requests in over ~100 ms, and 30-40
# letters were written before enough of them were in (the llguidance rows at most a fifth
# of the batch's) for any step to sit out (2026-12-07).
LETTERS = 'start: /[a-z]+/'
LETTER_STEPS = 150
# 40 booleans: ~80-120 steps a document, longer than the batch takes to arrive through the
# API server and than the letters. With the short SCHEMAS (~10 tokens) the requests on the
# index were over before the rest of the batch arrived on an H100 (2026-12-07: the 24
# done within a second), and no step had few enough on llguidance to sit out.
LONG = {"type": "array", "items": {"type": "boolean"}, "minItems": 40, "maxItems": 40}


def test_a_few_requests_on_llguidance_sit_out_instead_of_holding_the_batch(
        embedded_model, tmp_path_factory):
    """Device states (the GPU default) with the tiers: a batch of requests on their index
    and two on llguidance. The two sit out the steps with their last token in flight, so
    the batch's other steps sample without the host; every answer valid."""
    env = {**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": "0"}
    server = start_dotllm(tmp_path_factory, env=env)
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        # Compiled first: the batch starts on the index. (Its compile finished, not only
        # started: on an H100 the warm request was over within the compile's 0.6 s, and the
        # batch started on llguidance, too many of it for any to sit out.)
        client.completions.create(model=NAME, prompt="warm", max_tokens=200, extra_body={
            "structured_outputs": {"json": LONG}})
        server.wait_for_metric("dotllm_constraint_compile_seconds_count", 1)

        def ask(i: int) -> None:
            if i < 2:
                reply = client.completions.create(
                    model=NAME, prompt=f"letters {i}", max_tokens=LETTER_STEPS, seed=i,
                    extra_body={"structured_outputs": {"grammar": LETTERS},
                                "min_tokens": LETTER_STEPS})
                assert re.fullmatch("[a-z]+", reply.choices[0].text)
                assert reply.usage.completion_tokens == LETTER_STEPS
                return
            reply = client.completions.create(
                model=NAME, prompt=f"request {i}", max_tokens=200, seed=i,
                extra_body={"structured_outputs": {"json": LONG}})
            assert reply.choices[0].finish_reason == "stop", reply.choices[0].text
            jsonschema.validate(json.loads(reply.choices[0].text), LONG)

        with ThreadPoolExecutor(24) as pool:
            list(pool.map(ask, range(24)))
        sat_out = server.total("dotllm_steps_sat_out_total")
        undeferred = server.total("dotllm_steps_sampled_without_host_total")
        print({k: v for k, v in server.metrics().items()
               if k.startswith(("dotllm_steps", "dotllm_plans", "dotllm_constraint_tier"))})
        assert sat_out > 0 and undeferred > 0, server.log_tail()
    finally:
        stop_server(server)
