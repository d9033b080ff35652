"""An ASGI middleware (added through vLLM's own `--middleware` by `dotllm serve`): a stream
whose first event is an error is answered as that error, with the status and body the
same request gets unstreamed, not as a 200 stream that carries it.

vLLM sends an event stream's 200 before the request reaches the engine, so a constraint
only the engine can refuse (`compile_errors`) arrives as an in-band `{"error": ...}`
event, which the `openai` client raises as a generic `APIError` where the unstreamed
request raises `BadRequestError`. So the response start is held until the first event
(what a client waits for anyway): an error there becomes the response; anything else goes
out as it came. An error after the first event stays in-band: the status is sent by then.
"""

from __future__ import annotations

import json

# The endpoints whose answers stream and carry constraints (also `unenforced_report`'s).
COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


async def send_json(send, status: int, payload: dict) -> None:
    """A whole JSON response through an ASGI `send`."""
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _error_status(event: bytes) -> tuple[int, dict] | None:
    """(status, error) if `event` is vLLM's in-band error with an HTTP error code."""
    if not event.startswith(b"data: "):
        return None
    try:
        error = json.loads(event[len(b"data: "):]).get("error")
    except (ValueError, AttributeError):
        return None
    code = error.get("code") if isinstance(error, dict) else None
    if isinstance(code, int) and 400 <= code < 600:
        return code, error
    return None


class StreamErrors:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") not in COMPLETION_PATHS:
            return await self.app(scope, receive, send)
        return await self.app(scope, receive, _FirstEvent(send))


class _FirstEvent:
    """The `send` of one response: holds an event stream's start until its first event."""

    def __init__(self, send):
        self.send = send
        self.start: dict | None = None  # held
        self.buffer = b""
        self.answered = False  # replaced by an error response: the rest is dropped

    async def __call__(self, message: dict) -> None:
        if self.answered:
            return None
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers", []))
            if message.get("status") == 200 and headers.get(
                    b"content-type", b"").startswith(b"text/event-stream"):
                self.start = message
                return None
            return await self.send(message)
        if self.start is None or message["type"] != "http.response.body":
            return await self.send(message)
        self.buffer += message.get("body", b"")
        more = message.get("more_body", False)
        first, complete, _ = self.buffer.partition(b"\n\n")
        if not complete and more:
            return None
        if complete and (error := _error_status(first)) is not None:
            self.answered = True
            status, body = error
            return await send_json(self.send, status, {"error": body})
        start, self.start, body, self.buffer = self.start, None, self.buffer, b""
        await self.send(start)
        return await self.send({"type": "http.response.body", "body": body, "more_body": more})


MIDDLEWARE = f"{__name__}.{StreamErrors.__name__}"  # for vLLM's --middleware
