"""A plain vLLM server in the same environment stays stock: the plugin is loaded but idle."""

from __future__ import annotations

import openai
import pytest
import requests

pytestmark = pytest.mark.server


def test_plain_vllm_server_is_untouched(stock_vllm_server, embedded_model):
    info = requests.get(stock_vllm_server.url + "/version", timeout=10).json()
    assert info == {"version": "0.26.0"}

    client = openai.OpenAI(base_url=stock_vllm_server.base_url, api_key="x", max_retries=0)
    [model] = client.models.list().data
    assert model.id == str(embedded_model)
    reply = client.completions.create(model=model.id, prompt="Hello", max_tokens=4)
    assert reply.usage.completion_tokens > 0
