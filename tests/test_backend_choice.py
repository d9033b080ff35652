"""`dotllm serve` with an explicit stock backend runs stock vLLM's structured outputs: the
user's choice is honoured (an A/B switch in one install), never accepted and ignored."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
import requests

from dotllm.embedded_model import NAME
from tests.conftest import Server, start_dotllm, stop_server


@pytest.fixture(scope="module")
def xgrammar_server(embedded_model, tmp_path_factory) -> Iterator[Server]:
    server = start_dotllm(tmp_path_factory,
                          extra_args=("--structured-outputs-config.backend", "xgrammar"))
    yield server
    stop_server(server)


def test_an_explicit_stock_backend_serves_stock_vllm(xgrammar_server):
    assert "structured outputs: stock vLLM's xgrammar" in xgrammar_server.log.read_text()
    client = openai.OpenAI(base_url=xgrammar_server.base_url, api_key="none")
    reply = client.completions.create(model=NAME, prompt="x", max_tokens=5, extra_body={
        "structured_outputs": {"choice": ["yes", "no"]}})
    assert reply.choices[0].text in ("yes", "no")
    # What DotLLM alone serves (a Lark grammar) is xgrammar's to refuse.
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="x", max_tokens=5, extra_body={
            "structured_outputs": {"grammar": 'start: "x" ("y" | "z")~3'}})
    assert not any(name.startswith("dotllm_") for name in xgrammar_server.metrics())
    assert "dotllm" not in requests.get(xgrammar_server.url + "/version", timeout=10).json()


def test_the_default_backend_is_dotllms(dotllm_server):
    assert "structured outputs: stock vLLM's" not in dotllm_server.log.read_text()
    assert "dotllm" in requests.get(dotllm_server.url + "/version", timeout=10).json()
