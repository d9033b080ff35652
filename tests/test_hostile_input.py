"""Hostile input and faults through a real `dotllm serve`: bounded time and memory by
default, a clear 400 for the client's faults, never a 5xx, no schema poisoned by a
fault of the server's, and a normal request served right after each.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time

import jsonschema
import openai
import psutil
import pytest
import requests

from bench import stress
from dotllm.embedded_model import NAME
from tests.conftest import start_dotllm, stop_server

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def client(dotllm_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=dotllm_server.base_url, api_key="unused", max_retries=0)


def still_serving(client) -> None:
    reply = client.completions.create(model=NAME, prompt="x", max_tokens=3)
    assert reply.choices[0].text is not None


def post(server, body: bytes | dict, timeout: float = 120) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(server.base_url + "/completions", data=data, timeout=timeout,
                         headers={"content-type": "application/json"})


def nested_arrays(depth: int) -> dict:
    schema = inner = {"type": "array"}
    for _ in range(depth):
        inner["items"] = {"type": "array"}
        inner = inner["items"]
    return schema


WIDE = {"type": "object", "properties": {
    f"p{i:05d}" + "x" * 85: {"type": "string"} for i in range(20_000)}}  # 2 MB


@pytest.mark.parametrize(("constraint", "message"), [
    ({"json": WIDE}, "over the limit of 1,024 KiB (--dotllm-max-schema-kib)"),
    ({"json": nested_arrays(500)}, "nests deeper than"),  # caught on the body, first
    ({"json": nested_arrays(102)}, "JSON schema nests deeper than 100 levels (at /items/"),
    ({"json": {"enum": list(range(100_000))}}, "100,000 values, over the limit of 10,000 "
                                                "(--dotllm-max-choices)"),
    ({"choice": [str(i) for i in range(50_000)]}, "choice has 50,000 values"),
    ({"regex": "a" * 70_000}, "(--dotllm-max-regex-chars)"),
    ({"json": {"properties": {"a": {"$ref": "#/$defs/gone"}}}},
     "$ref '#/$defs/gone' at /properties/a points to nothing"),
    ({"json": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}},
     "refers back to itself"),
    ({"json": "[1, 2]"}, "JSON schema must be an object or a boolean"),
    ({"structural_tag": json.dumps({"type": "structural_tag", "format": {"type": "nope"}})},
     "Invalid structured_outputs structural_tag: "),
])
def test_what_needs_no_compile_is_refused_at_once_by_name(dotllm_server, client, constraint,
                                                          message):
    started = time.monotonic()
    reply = post(dotllm_server, {"model": NAME, "prompt": "x", "max_tokens": 5,
                                 "structured_outputs": constraint})
    assert reply.status_code == 400, reply.text[:500]
    assert message in reply.json()["error"]["message"], reply.text[:500]
    assert time.monotonic() - started < 5
    still_serving(client)


def test_a_body_nested_past_the_parser_is_a_400_that_says_so(dotllm_server, client):
    body = (b'{"model": "tiny-llama-tekken", "prompt": "x", "max_tokens": 5, "x": '
            + b"[" * 1000 + b"]" * 1000 + b"}")
    reply = post(dotllm_server, body)
    assert reply.status_code == 400
    assert "request body nests deeper than 108 levels" in reply.json()["error"]["message"]
    still_serving(client)


def test_the_api_server_stays_responsive_while_a_large_schema_is_checked(dotllm_server,
                                                                        client):
    """A 1,000 KiB schema (under the bound) is checked in the API server: bounded work,
    /health answers meanwhile. It ends in a $ref to nothing, so no engine work follows."""
    schema = {"type": "object", "properties": {
        f"p{i:05d}" + "x" * 85: {"type": "string"} for i in range(9_000)}}
    schema["properties"]["last"] = {"$ref": "#/$defs/missing"}
    gaps, done = [], threading.Event()

    def poll():
        while not done.is_set():
            started = time.monotonic()
            requests.get(dotllm_server.url + "/health", timeout=30)
            gaps.append(time.monotonic() - started)
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        reply = post(dotllm_server, {"model": NAME, "prompt": "x", "max_tokens": 5,
                                     "structured_outputs": {"json": schema}})
    finally:
        done.set()
        poller.join()
    assert reply.status_code == 400 and "points to nothing" in reply.text
    assert max(gaps) < 1.5, max(gaps)
    still_serving(client)


def compile_workers(server) -> list[psutil.Process]:
    return stress.compile_workers(server.process.pid)


def ask(client, schema: dict, seed: int = 0, max_tokens: int = 60) -> str:
    reply = client.completions.create(model=NAME, prompt="x", max_tokens=max_tokens,
                                      seed=seed, extra_body={"structured_outputs": {
                                          "json": schema}})
    return reply.choices[0].text


def test_a_worker_killed_while_idle_blames_no_one(dotllm_server, client):
    dotllm_server.wait_for_compiles()
    ask(client, {"type": "object", "properties": {"idle0": {"type": "boolean"}},
                 "required": ["idle0"]})
    dotllm_server.wait_for_compiles()
    workers = compile_workers(dotllm_server)
    assert workers
    before = dotllm_server.metrics()
    for worker in workers:  # as the OOM killer or an operator would
        worker.send_signal(signal.SIGKILL)
    schema = {"type": "object", "properties": {"idle1": {"type": "integer"}},
              "required": ["idle1"]}
    ask(client, schema)
    dotllm_server.wait_for_compiles()
    after = dotllm_server.metrics()
    crash = 'dotllm_constraint_failures_total{reason="crash"}'
    assert after.get(crash, 0) == before.get(crash, 0)
    assert after["dotllm_constraint_compile_seconds_count"] > before.get(
        "dotllm_constraint_compile_seconds_count", 0)
    text = ask(client, schema, max_tokens=40)  # now on its index
    jsonschema.validate(json.loads(text), schema)


def test_a_worker_killed_mid_compile_does_not_poison_the_schema(dotllm_server, client):
    """The compile is tried again on a fresh worker; the request, served on llguidance
    meanwhile, is valid; the schema is not remembered as failed."""
    dotllm_server.wait_for_compiles()
    before = dotllm_server.metrics()
    slow = {"type": "object", "required": ["code"], "properties": {
        "code": {"type": "string", "pattern": "^[ab]{0,6}a[ab]{14}$"}}}  # ~3 s here
    text = ask(client, slow, max_tokens=40)
    jsonschema.validate(json.loads(text), slow)
    assert dotllm_server.compiling()  # its compile is under way (several seconds)
    time.sleep(0.5)
    for worker in compile_workers(dotllm_server):
        worker.send_signal(signal.SIGKILL)
    dotllm_server.wait_for_compiles(timeout_s=180)
    after = dotllm_server.metrics()
    crash = 'dotllm_constraint_failures_total{reason="crash"}'
    assert after.get(crash, 0) == before.get(crash, 0)
    text = ask(client, slow, max_tokens=40)
    jsonschema.validate(json.loads(text), slow)


def test_a_queued_compile_nobody_waits_for_is_cancelled(dotllm_server):
    """Clients that send a new schema and go away: their compiles do not hold the queue."""
    dotllm_server.wait_for_compiles()
    before = dotllm_server.metrics().get("dotllm_constraint_cancelled_total", 0)
    for i in range(8):
        schema = {"type": "object", "required": ["code"], "properties": {"code": {
            "type": "string", "pattern": f"^[ab]{{0,6}}a[ab]{{14}}{i}$"}}}  # each ~3 s
        with requests.post(dotllm_server.base_url + "/completions", stream=True, timeout=60,
                           json={"model": NAME, "prompt": "x", "max_tokens": 200,
                                 "stream": True, "structured_outputs": {"json": schema}}) as r:
            next(r.iter_lines())  # the stream started: the request is running
    deadline = time.monotonic() + 120
    while dotllm_server.metrics().get("dotllm_constraint_cancelled_total", 0) == before:
        assert time.monotonic() < deadline, "no abandoned compile was cancelled"
        time.sleep(0.5)
    dotllm_server.wait_for_compiles(timeout_s=120)
    assert dotllm_server.metrics().get("dotllm_constraint_pool_queue_length", 0) == 0


@pytest.fixture(scope="module")
def constrained_server(embedded_model, tmp_path_factory):
    """A second server with a small compile memory bound and disk cache, sharing a cache
    directory it can corrupt between two starts."""
    shared = tmp_path_factory.mktemp("hostile-indexes")
    servers = []

    def start():
        server = start_dotllm(tmp_path_factory, index_cache_dir=shared, extra_args=(
            "--dotllm-max-compile-memory-mib", "300", "--dotllm-index-cache-disk-mib", "1"))
        servers.append(server)
        return server

    yield start
    for server in servers:
        stop_server(server)


def test_faults_of_the_server_are_never_the_clients(constrained_server, vocabulary):
    """One server: a compile over the memory bound fails its constraint only (served by
    llguidance, not a 400) and no worker grows past the bound; the disk cache stays within
    its bytes. A restart over a corrupted entry: the request that finds it is served."""
    from dotllm.compiler.cache import cache_key
    from dotllm.compiler.spec import ConstraintSpec

    server = constrained_server()
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            for worker in compile_workers(server):
                with contextlib.suppress(psutil.NoSuchProcess):
                    peak[0] = max(peak[0], worker.memory_info().rss)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        reply = client.chat.completions.create(  # json_object's index needs far more
            model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=30, seed=1,
            response_format={"type": "json_object"})
        assert reply.choices[0].message.content is not None
        server.wait_for_compiles(timeout_s=300)
    finally:
        done.set()
        watcher.join()
    metrics = server.metrics()
    assert metrics.get('dotllm_constraint_failures_total{reason="crash"}', 0) == 1
    assert peak[0] < 900 * 2**20, peak[0]  # the bound, plus what a worker holds at start

    # Each literal's states all have masks of their own: ~0.6 MiB an entry.
    regexes = [f"{c}0123456789abcdefghijklmnopqrstuvwxyz" for c in "ABCD"]
    for regex in regexes:
        client.completions.create(model=NAME, prompt="x", max_tokens=40,
                                  extra_body={"structured_outputs": {"regex": regex}})
        server.wait_for_compiles(timeout_s=300)
    entries = list(server.index_cache_dir.rglob("*.idx"))
    assert sum(p.stat().st_size for p in entries) <= 2**20 + max(
        p.stat().st_size for p in entries)
    assert len(entries) < len(regexes)  # the oldest went

    # Corrupt the newest entry's last mask row (not its initial state's), restart.
    spec = ConstraintSpec.regex(regexes[-1])
    path = next(p for p in entries if p.stem == cache_key(vocabulary.digest, spec.key))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    stop_server(server)
    restarted = constrained_server()
    client = openai.OpenAI(base_url=restarted.base_url, api_key="unused", max_retries=0)
    reply = client.completions.create(model=NAME, prompt="x", max_tokens=40,
                                      extra_body={"structured_outputs": {"regex": regexes[-1]}})
    assert reply.choices[0].text == regexes[-1]
    metrics = restarted.metrics()
    assert metrics.get('dotllm_constraint_cache_hits_total{level="disk"}') == 1
    assert metrics.get('dotllm_constraint_tier_handover_total{outcome="corrupt"}') == 1
    assert metrics.get('dotllm_constraint_cache_corrupt_total{level="disk"}') == 1
    assert not path.exists()  # dropped: the next request recompiles it
    assert os.environ.get("DOTLLM_SERVE") is None  # the test process stays stock
