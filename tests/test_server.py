"""End to end: a real `dotllm serve` process on the embedded model, driven by `openai`."""

from __future__ import annotations

import asyncio

import openai
import pytest
import requests

from dotllm import __version__
from dotllm.embedded_model import NAME

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def client(dotllm_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=dotllm_server.base_url, api_key="unused", max_retries=0)


def test_health(dotllm_server):
    assert requests.get(dotllm_server.url + "/health", timeout=10).status_code == 200


def test_version_names_dotllm_and_vllm(dotllm_server):
    info = requests.get(dotllm_server.url + "/version", timeout=10).json()
    assert info == {"version": "0.26.0", "dotllm": __version__}


def test_models_lists_the_embedded_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [NAME]
    assert models[0].max_model_len == 4096


def test_chat_completion(client):
    reply = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Say hello."}],
        max_tokens=12,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("length", "stop")
    assert 0 < reply.usage.completion_tokens <= 12
    assert reply.usage.prompt_tokens > 5


def test_chat_completion_streaming(client):
    stream = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    finish = [f for f in finish if f]
    assert text
    assert finish in (["length"], ["stop"])
    assert chunks[-1].usage is not None and 0 < chunks[-1].usage.completion_tokens <= 10


def test_completion_is_deterministic_at_temperature_zero(client):
    def complete():
        return client.completions.create(
            model=NAME, prompt="The capital of France is", max_tokens=8, temperature=0
        )

    first, second = complete(), complete()
    assert first.choices[0].text
    assert first.choices[0].text == second.choices[0].text
    assert first.usage.completion_tokens == 8 or first.choices[0].finish_reason == "stop"


def test_completion_streaming(client):
    stream = client.completions.create(
        model=NAME, prompt="Once upon a time", max_tokens=10, temperature=0, stream=True
    )
    pieces = [c.choices[0].text for c in stream if c.choices]
    assert len(pieces) >= 2
    assert "".join(pieces)


def test_concurrent_requests(dotllm_server):
    async def run() -> list:
        client = openai.AsyncOpenAI(
            base_url=dotllm_server.base_url, api_key="unused", max_retries=0
        )
        requests_ = [
            client.chat.completions.create(
                model=NAME,
                messages=[{"role": "user", "content": f"Request number {i}"}],
                max_tokens=16,
                seed=i,
            )
            for i in range(8)
        ] + [
            client.completions.create(model=NAME, prompt=f"Prompt {i}", max_tokens=16)
            for i in range(4)
        ]
        try:
            return await asyncio.gather(*requests_)
        finally:
            await client.close()

    replies = asyncio.run(run())
    assert len(replies) == 12
    for reply in replies:
        assert reply.usage.completion_tokens > 0
    assert len({r.id for r in replies}) == 12


def test_unknown_model_is_a_404_and_server_keeps_serving(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
    assert client.models.list().data
