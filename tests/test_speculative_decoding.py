"""End to end with speculative decoding (vLLM's n-gram drafter, on CPU): drafts are
validated against the guide, rejected ones rolled back, and each request gets one mask
row per draft position plus the bonus token; outputs stay valid."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from dotllm.embedded_model import NAME
from tests.conftest import start_dotllm, stop_server

pytestmark = pytest.mark.server

SPECULATIVE = ('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, '
               '"prompt_lookup_min": 1}')


@pytest.fixture(scope="module")
def speculative_server(embedded_model, tmp_path_factory):
    server = start_dotllm(tmp_path_factory, extra_args=("--speculative-config", SPECULATIVE))
    yield server
    stop_server(server)


def test_constrained_outputs_stay_valid_with_drafts(speculative_server):
    client = openai.OpenAI(base_url=speculative_server.base_url, api_key="x", max_retries=0)
    before = speculative_server.metrics()
    # Repetitive prompts give the n-gram drafter something to propose. Free choices (the
    # booleans) get drafts rejected; forced text (the choice, the regex) gets them accepted.
    prompt = "[true, false, true, false, true, false, true, false, true, false, true"
    schema = {"type": "array", "items": {"type": "boolean"}, "minItems": 3, "maxItems": 30}
    for seed in range(4):
        reply = client.completions.create(
            model=NAME, prompt=prompt, max_tokens=120, seed=seed,
            extra_body={"structured_outputs": {"json": schema}})
        jsonschema.validate(json.loads(reply.choices[0].text), schema)
    text = "the quick brown fox jumps over the lazy dog"
    reply = client.completions.create(
        model=NAME, prompt=(text + " ") * 4, max_tokens=60, temperature=0,
        extra_body={"structured_outputs": {"choice": [f"{text} {text}"]}})
    assert reply.choices[0].text == f"{text} {text}"
    regex = r'\{"a": 1(, "a": 1){5}\}'
    reply = client.completions.create(
        model=NAME, prompt='{"a": 1, "a": 1, "a": 1, "a": 1', max_tokens=60, temperature=0,
        extra_body={"structured_outputs": {"regex": regex}})
    assert re.fullmatch(regex, reply.choices[0].text)
    after = speculative_server.metrics()

    def delta(prefix: str) -> float:
        return sum(v - before.get(k, 0) for k, v in after.items() if k.startswith(prefix))

    drafts = delta("vllm:spec_decode_num_draft_tokens_total")
    accepted = delta("vllm:spec_decode_num_accepted_tokens_total")
    assert 0 < accepted < drafts
    # One row per draft position plus the bonus token, every step: a row for each token
    # generated and for each draft rejected.
    generated = delta("vllm:generation_tokens_total")
    assert delta("dotllm_mask_rows_total") >= generated + drafts - accepted
