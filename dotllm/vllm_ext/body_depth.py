"""An ASGI middleware (added through vLLM's own `--middleware` by `dotllm serve`): a request
body nested deeper than Python's JSON parser can go gets a 400 that says so.

A body nested ~1,000 levels deep overflows the parser's recursion and vLLM's server
answers `{"detail": "There was an error parsing the body"}`. Bodies of the OpenAI
endpoints are scanned first (brackets outside strings; a body with few brackets is not
scanned at all) and one deeper than the schema depth bound allows is refused by name.
"""

from __future__ import annotations

import re

from dotllm.compiler.metrics import count_refusal
from dotllm.settings import Settings
from dotllm.vllm_ext.stream_errors import send_json

# The levels a request body adds around a schema (body, response_format, json_schema, ...).
_ENVELOPE = 8
_TOKENS = re.compile(rb'\\.|["\[\]{}]', re.S)
_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})


def nesting(body: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (strings skipped)."""
    depth = deepest = 0
    in_string = False
    for match in _TOKENS.finditer(body):
        token = match.group()
        if token == b'"':
            in_string = not in_string
        elif in_string or token.startswith(b"\\"):
            continue
        elif token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


class BodyDepth:
    def __init__(self, app):
        self.app = app
        self.limit = Settings.from_environ().max_schema_depth + _ENVELOPE

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") not in _PATHS:
            return await self.app(scope, receive, send)
        messages, body = [], b""
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        if body.count(b"[") + body.count(b"{") > self.limit and nesting(body) > self.limit:
            return await self._refuse(send)

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        count_refusal("limit")
        await send_json(send, 400, {"error": {
            "message": f"the request body nests deeper than {self.limit} levels "
                       "(--dotllm-max-schema-depth and the request around the schema)",
            "type": "BadRequestError", "param": None, "code": 400}})


MIDDLEWARE = f"{__name__}.{BodyDepth.__name__}"  # for vLLM's --middleware
