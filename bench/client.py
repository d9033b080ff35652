"""One completion as a benchmark sees it: when the first token came and the gaps between
the next ones (streamed), how it ended, and whether the server refused it (a 400, before
the stream or inside it, is the server's answer to the request, not a failure to
measure)."""

from __future__ import annotations

import asyncio
import codecs
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp

CONNECT_ATTEMPTS = 4


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
    retries: int = 0  # connections reset before the response started
    # The keywords the server said it did not enforce (DotLLM's `unenforced` field on the
    # finishing chunk, for a non-strict schema it serves relaxed): an invalid answer then
    # is one the client was told of, not a broken constraint.
    unenforced: list[str] = field(default_factory=list)


def session(base_url: str, timeout_s: float = 1800) -> aiohttp.ClientSession:
    """The client of a batch: aiohttp, whose one event loop opens 256 streams within
    ~30 ms and reads their chunks at a few us each. httpx (encode/httpx#3215) spent ~8 ms
    of CPU a request at 256 at once and ~170 us a streamed chunk on this CPU: on a GPU the
    benchmark's own client then admitted a batch over seconds, and its "256" requests
    decoded 17-97 rows a step (bench/RESULTS.md, "how wide the batches really were")."""
    return aiohttp.ClientSession(base_url=base_url,
                                 connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=timeout_s))


async def get_text(client: aiohttp.ClientSession, path: str) -> str:
    async with client.get(path) as response:
        return await response.text()


async def sse_lines(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """The stream's lines, split at "\n" only: a completion's JSON may carry U+2028 or
    U+0085 unescaped, where str.splitlines would cut a line in two."""
    pending = ""
    async for chunk in chunks:
        *lines, pending = (pending + chunk).split("\n")
        for line in lines:
            yield line.removesuffix("\r")
    if pending:
        yield pending.removesuffix("\r")


async def _text(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The body as text as it comes (a chunk may end inside a UTF-8 character)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    async for chunk in response.content.iter_any():
        yield decoder.decode(chunk)
    yield decoder.decode(b"", final=True)


async def complete(client: aiohttp.ClientSession, payload: dict,
                   stream: bool = True) -> Reply:
    """POSTs `payload` to /v1/completions, streamed with usage on; or, without `stream`, as
    one response (no TTFT nor gaps then; the API server formats no chunk a token). A
    connection that breaks before the response starts is tried again (at 256 streams
    opened at once a local connection is now and then reset before the server reads the
    request; the request never ran): `Reply.retries` counts them."""
    payload = ({**payload, "stream": True, "stream_options": {"include_usage": True}}
               if stream else {**payload, "stream": False})
    for retries in range(CONNECT_ATTEMPTS):
        started = time.perf_counter()
        try:
            async with client.post("/v1/completions", json=payload) as response:
                reply = await (_read if stream else _read_whole)(response, started)
        except aiohttp.ClientConnectionError:
            if retries == CONNECT_ATTEMPTS - 1:
                raise
            await asyncio.sleep(0.05 * (retries + 1))
            continue
        reply.retries = retries
        return reply
    raise AssertionError("unreachable")


async def _refused(response: aiohttp.ClientResponse) -> Reply:
    body = (await response.read())[:300].decode(errors="replace")
    return Reply("400" if response.status == 400 else "error",
                 error=f"{response.status}: {body}")


async def _read_whole(response: aiohttp.ClientResponse, started: float) -> Reply:
    if response.status != 200:
        return await _refused(response)
    answer = json.loads(await response.read())
    choice = answer["choices"][0]
    reply = Reply("ok", e2e_s=time.perf_counter() - started, text=choice.get("text") or "",
                  tokens=answer["usage"]["completion_tokens"],
                  finish=choice.get("finish_reason"),
                  unenforced=list((choice.get("unenforced") or {}).get("keywords", [])))
    if not reply.text:
        return Reply("error", error=f"no text came back (finish_reason {reply.finish})")
    return reply


async def _read(response: aiohttp.ClientResponse, started: float) -> Reply:
    if response.status != 200:
        return await _refused(response)
    first = last = None
    reply = Reply("ok")
    try:
        async for line in sse_lines(_text(response)):
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
                if choice.get("unenforced"):
                    reply.unenforced = list(choice["unenforced"].get("keywords", []))
            if chunk.get("usage"):
                reply.tokens = chunk["usage"]["completion_tokens"]
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
        # The stream broke after it started: the server's answer was cut, a result.
        return Reply("error", tokens=reply.tokens, error=f"stream cut: {e!r}")
    reply.e2e_s = time.perf_counter() - started
    if first is None:
        return Reply("error", error=f"no text came back (finish_reason {reply.finish})")
    reply.ttft_s = first - started
    return reply
