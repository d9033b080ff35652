"""The stream-error middleware on a bare ASGI app: what a stream's first event decides."""

from __future__ import annotations

import asyncio
import json

from dotllm.vllm_ext.stream_errors import StreamErrors

ERROR = {"message": "Invalid structured output: cannot compile", "type": "BadRequestError",
         "param": None, "code": 400}
SSE = [(b"content-type", b"text/event-stream; charset=utf-8")]


def app_sending(*bodies: bytes, headers=SSE, status=200):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for i, body in enumerate(bodies):
            await send({"type": "http.response.body", "body": body,
                        "more_body": i < len(bodies) - 1})
    return app


def run(app, path="/v1/completions") -> list[dict]:
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "path": path, "method": "POST"}
    asyncio.run(StreamErrors(app)(scope, receive, send))
    return sent


def test_an_error_as_the_first_event_is_the_response():
    error = b"data: " + json.dumps({"error": ERROR}).encode()
    sent = run(app_sending(error[:10], error[10:] + b"\n\n", b"data: [DONE]\n\n"))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 400
    assert dict(sent[0]["headers"])[b"content-type"] == b"application/json"
    assert json.loads(sent[1]["body"]) == {"error": ERROR}


def test_a_stream_that_starts_well_goes_out_as_it_came():
    chunk = b'data: {"choices": [{"text": "x"}]}\n\n'
    error = b"data: " + json.dumps({"error": ERROR}).encode() + b"\n\n"
    sent = run(app_sending(chunk[:5], chunk[5:] + error, b"data: [DONE]\n\n"))
    assert sent[0]["status"] == 200 and sent[0]["headers"] == SSE
    body = b"".join(m.get("body", b"") for m in sent[1:])
    assert body == chunk + error + b"data: [DONE]\n\n"  # a later error stays in-band
    assert sent[-1]["more_body"] is False


def test_other_responses_pass_untouched():
    json_body = json.dumps({"error": ERROR}).encode()
    plain = [(b"content-type", b"application/json")]
    assert run(app_sending(json_body, headers=plain, status=400)) == [
        {"type": "http.response.start", "status": 400, "headers": plain},
        {"type": "http.response.body", "body": json_body, "more_body": False}]
    error = b"data: " + json.dumps({"error": ERROR}).encode() + b"\n\n"
    assert run(app_sending(error), path="/v1/models")[0]["status"] == 200
