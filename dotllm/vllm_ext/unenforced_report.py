"""Patch `unenforced_report`: a schema DotLLM cannot fully enforce is refused under
`"strict": true` and otherwise served, and the response says what was not enforced.

Targets (vLLM 0.26, API server):
- `ChatCompletionRequest.extract_structured_outputs` and
  `CompletionRequest.extract_structured_outputs`: the one place that sees both the
  request's JSON schema and whether it is strict (`response_format.json_schema.strict`).
  `relaxation.serve` decides: a strict schema with what no engine here enforces is a 400
  naming each keyword and its JSON pointer; any other is replaced by the schema without
  them, which the engine then serves as any schema.
- an ASGI middleware (`UnenforcedReport`, added through vLLM's own `--middleware` option
  by `dotllm serve`) tells the client. On such a request, the response
  carries the header `X-DotLLM-Unenforced` (the keywords and pointers, known before the
  first token) and, on each choice (non-streamed) or on the chunk that finishes it
  (streamed), a field

      "unenforced": {"keywords": ["uniqueItems at /properties/tags"], "valid": true}

  where `valid` says whether the finished output validates against the whole schema
  (with `error` naming the first failure when it does not). The middleware learns of the
  request through a context variable: the request handler runs in its task.
Each such request adds one to `dotllm_constraint_unenforced_total{keyword}` per keyword.
"""

from __future__ import annotations

import contextvars
import json
import urllib.parse
from dataclasses import dataclass, field, replace

from dotllm.vllm_ext.patching import api_server_module, replace_attribute
from dotllm.vllm_ext.stream_errors import COMPLETION_PATHS

NAME = "unenforced_report"
HEADER = b"x-dotllm-unenforced"


@dataclass
class _Request:
    """What the middleware needs to know of one HTTP request, filled in by its handler."""

    keywords: list[str] = field(default_factory=list)
    validator: object = None  # OutputValidator of the schema as asked


_CURRENT: contextvars.ContextVar[_Request | None] = contextvars.ContextVar(
    "dotllm_unenforced_request", default=None)


def _is_strict(request) -> bool:
    response_format = getattr(request, "response_format", None)
    json_schema = getattr(response_format, "json_schema", None)
    return getattr(response_format, "type", None) == "json_schema" and bool(
        getattr(json_schema, "strict", False))


def serve_params(params, strict: bool):
    """`params` with the JSON schema DotLLM serves, and what it leaves unenforced
    (ValueError, a 400, for a strict schema it cannot enforce)."""
    from dotllm.compiler import relaxation
    from dotllm.compiler.metrics import count_refusal
    from dotllm.compiler.spec import ConstraintError
    from dotllm.settings import Settings
    from dotllm.vllm_ext.constraints import checked, spec_from_params

    if params is None or params.json is None:
        return params, None
    settings = Settings.from_environ()

    def answer():
        served = relaxation.serve(spec_from_params(params, settings.limits), strict)
        return served if served.unenforced else None  # (the memo keeps no schema then)

    try:
        served = checked("served strictly" if strict else "served", params, settings, answer)
    except ConstraintError as e:
        count_refusal(e.reason)
        raise ValueError(f"Invalid structured output: {e}") from None
    if served is None:
        return params, None
    return replace(params, json=served.spec.schema), served


def _reporting(extract):
    def extract_structured_outputs(self):
        params, served = serve_params(extract(self), _is_strict(self))
        if served is not None:
            _record(served)
        return params

    return extract_structured_outputs


def _record(served) -> None:
    from dotllm.compiler.metrics import unenforced_counter
    from dotllm.compiler.validation import OutputValidator

    keywords = [str(u) for u in served.unenforced]
    counter = unenforced_counter()
    for item in served.unenforced:
        counter.labels(keyword=item.keyword).inc()
    if (request := _CURRENT.get()) is not None:
        request.keywords = keywords
        request.validator = OutputValidator(served.original)


def _verdict(request: _Request, text: str) -> dict:
    verdict = {"keywords": request.keywords, "valid": True}
    if (failure := request.validator.check_text(text)) is not None:
        verdict.update(valid=False, error=str(failure))
    return verdict


def _text(choice: dict) -> str:
    message = choice.get("message") or choice.get("delta") or {}
    return (message.get("content") if isinstance(message, dict) else None) or \
        choice.get("text") or ""


class UnenforcedReport:
    """ASGI middleware: adds the header and the per-choice `unenforced` field."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") not in COMPLETION_PATHS:
            return await self.app(scope, receive, send)
        request = _Request()
        token = _CURRENT.set(request)
        try:
            await self.app(scope, receive, _Rewriter(request, send))
        finally:
            _CURRENT.reset(token)


class _Rewriter:
    """The `send` of one response: passes it through unless its request left keywords
    unenforced. A JSON body is held until complete (its length changes); an event stream
    is rewritten event by event."""

    def __init__(self, request: _Request, send):
        self.request = request
        self.send = send
        self.start: dict | None = None
        self.mode = "pass"
        self.buffer = b""
        self.texts: dict[int, list[str]] = {}

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            return await self.on_start(message)
        if message["type"] != "http.response.body" or self.mode == "pass":
            return await self.send(message)
        self.buffer += message.get("body", b"")
        more = message.get("more_body", False)
        if self.mode == "json":
            if not more:
                body = self.rewrite_json(self.buffer)
                headers = [(k, v) for k, v in self.start["headers"] if k != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await self.send({**self.start, "headers": headers})
                await self.send({"type": "http.response.body", "body": body})
            return None
        events, _, self.buffer = self.buffer.rpartition(b"\n\n")
        body = b"".join(self.rewrite_event(e) + b"\n\n" for e in events.split(b"\n\n")
                        if e) if events else b""
        if not more:
            body += self.buffer
            self.buffer = b""
        return await self.send({"type": "http.response.body", "body": body,
                                "more_body": more})

    async def on_start(self, message: dict) -> None:
        if not self.request.keywords or message.get("status") != 200:
            return await self.send(message)
        value = urllib.parse.quote("; ".join(self.request.keywords), safe=" /,;:@~#$'()*+=")
        message = {**message, "headers": [*message.get("headers", []), (HEADER, value.encode())]}
        content_type = dict(message["headers"]).get(b"content-type", b"")
        if content_type.startswith(b"text/event-stream"):
            self.mode = "stream"
            return await self.send(message)
        self.mode, self.start = "json", message
        return None

    def rewrite_json(self, body: bytes) -> bytes:
        try:
            response = json.loads(body)
        except ValueError:
            return body
        for choice in response.get("choices") or []:
            choice["unenforced"] = _verdict(self.request, _text(choice))
        return json.dumps(response, ensure_ascii=False).encode()

    def rewrite_event(self, event: bytes) -> bytes:
        if not event.startswith(b"data: ") or event == b"data: [DONE]":
            return event
        try:
            chunk = json.loads(event[len(b"data: "):])
        except ValueError:
            return event
        changed = False
        for choice in chunk.get("choices") or []:
            index = choice.get("index", 0)
            self.texts.setdefault(index, []).append(_text(choice))
            if choice.get("finish_reason") is not None:
                choice["unenforced"] = _verdict(self.request, "".join(self.texts.pop(index)))
                changed = True
        return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() if changed else event


MIDDLEWARE = f"{__name__}.{UnenforcedReport.__name__}"  # for vLLM's --middleware


def apply(in_launcher: bool) -> bool:
    modules = [api_server_module(f"vllm.entrypoints.openai.{name}.protocol", in_launcher)
               for name in ("chat_completion", "completion")]
    if None in modules:
        return False
    for module in modules:
        request_cls = getattr(module, "ChatCompletionRequest", None) or module.CompletionRequest
        replace_attribute(request_cls, "extract_structured_outputs", _reporting, NAME)
    return True
