"""One streamed completion as a benchmark sees it: when the first token came, the gaps
between the next ones, how it ended, and whether the server refused it (a 400, before the
stream or inside it, is the server's answer to the request, not a failure to measure)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx


@dataclass
class Reply:
    status: str  # ok | 400 | error
    ttft_s: float = float("nan")
    e2e_s: float = float("nan")
    tokens: int = 0
    finish: str | None = None
    text: str = ""
    gaps_s: list[float] = field(default_factory=list)  # between chunks that carried text
    error: str | None = None


async def sse_lines(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """The stream's lines, split at "\n" only: a completion's JSON may carry U+2028 or
    U+0085 unescaped, where httpx's aiter_lines (str.splitlines) would cut a line in two."""
    pending = ""
    async for chunk in chunks:
        *lines, pending = (pending + chunk).split("\n")
        for line in lines:
            yield line.removesuffix("\r")
    if pending:
        yield pending.removesuffix("\r")


async def stream_completion(client: httpx.AsyncClient, payload: dict) -> Reply:
    """POSTs `payload` to /v1/completions with streaming and usage on."""
    payload = {**payload, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = last = None
    reply = Reply("ok")
    async with client.stream("POST", "/v1/completions", json=payload) as response:
        if response.status_code != 200:
            body = (await response.aread())[:300].decode(errors="replace")
            return Reply("400" if response.status_code == 400 else "error",
                         error=f"{response.status_code}: {body}")
        async for line in sse_lines(response.aiter_text()):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]
                code = error.get("code") if isinstance(error, dict) else None
                return Reply("400" if code == 400 else "error", tokens=reply.tokens,
                             error=str(error)[:300])
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        reply.gaps_s.append(now - last)
                    last = now
                    reply.text += choice["text"]
                reply.finish = choice.get("finish_reason") or reply.finish
            if chunk.get("usage"):
                reply.tokens = chunk["usage"]["completion_tokens"]
    reply.e2e_s = time.perf_counter() - started
    if first is None:
        return Reply("error", error=f"no text came back (finish_reason {reply.finish})")
    reply.ttft_s = first - started
    return reply
