"""The serving benchmark (bench/serve.py) as a user runs it: a short CPU sitting of DotLLM
against stock vLLM with xgrammar on the embedded model, every scenario, checked for the
results, the tables and the plots it promises and for figures that make sense. And the
arithmetic its figures rest on."""

from __future__ import annotations

import asyncio
import json
import math

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench import client, overlap, prometheus, scenarios, serve


def test_a_histograms_mean_between_two_readings_over_its_label_sets():
    def reading(count: float, total: float) -> dict[str, float]:
        return {**{f'vllm:x_{k}{{engine="{e}"}}': v / 2 for e in "01"
                   for k, v in (("count", count), ("sum", total))},
                'vllm:x_bucket{engine="0",le="0.01"}': 3.0, "vllm:y_sum": 7.0}

    before, after = reading(10, 0.05), reading(110, 1.25)
    assert prometheus.mean_between(before, after, "vllm:x") == pytest.approx(0.012)
    assert math.isnan(prometheus.mean_between(after, after, "vllm:x"))
    assert prometheus.increase(before, after, "vllm:x_count") == 100
    assert prometheus.increase(before, after, "vllm:x") == 0  # not vllm:x_count's samples


def test_the_overlap_bench_says_what_served_a_waiting_requests_first_token():
    waits = 'dotllm_constraint_prefill_waits_total{outcome="%s"}'
    before = {waits % "index": 2.0, waits % "llguidance": 5.0}
    assert overlap.first_token_on(before, {**before, waits % "index": 3.0}) == "index"
    assert overlap.first_token_on(before, {**before, waits % "llguidance": 6.0}) == "llguidance"
    assert overlap.first_token_on(before, before) is None  # it did not wait (or no DotLLM)
    rows = [{"server": "tiered", "prompt_tokens": 9000, "repeat": i, "free_ttft_s": 0.5,
             "ttft_s": 0.6, "compile_s": 0.3, "first_token_on": on}
            for i, on in enumerate(["index", "llguidance", "index"])]
    line = overlap.summary(rows).splitlines()[-1]
    assert line.startswith("| tiered | 9000 |") and line.endswith("| 2 of 3 |")


def test_stream_lines_split_at_newlines_only_whatever_the_chunks():
    # Random weights write U+2028 and U+0085, which JSON leaves unescaped: a client that
    # split them as line ends cut a chunk's JSON in two on the H200 (long-string x256).
    events = ['data: {"text": "a\u2028b\x85c"}', "", "data: [DONE]", ""]
    stream = "\r\n".join(events)

    async def lines(size: int) -> list[str]:
        async def chunks():
            for i in range(0, len(stream), size):
                yield stream[i:i + size]
        return [line async for line in client.sse_lines(chunks())]

    for size in (1, 5, len(stream)):
        assert asyncio.run(lines(size)) == events[:-1]
    assert json.loads(events[0][6:])["text"] == "a\u2028b\x85c"


EVENT = ('data: {"choices": [{"text": "hi", "finish_reason": "stop"}], '
         '"usage": {"completion_tokens": 1}}\n\n')


def _stream_with(handler, stream: bool = True) -> client.Reply:
    """`client.complete` against a local server answering with `handler` (aiohttp.web)."""
    async def go():
        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        async with TestServer(app) as server, client.session(str(server.make_url(""))) as c:
            return await client.complete(c, {"prompt": "p"}, stream)
    return asyncio.run(go())


def _answer(text: str, status: int = 200):
    async def handler(request):
        return web.Response(status=status, text=text)
    return handler


async def _reset(request):
    """The connection closed before any response (as a local socket reset is seen)."""
    request.transport.close()
    return web.Response()


def test_a_connection_reset_before_the_response_is_tried_again():
    # At 256 streams opened at once on the H200 one connection now and then broke before
    # the server answered, which ended the whole sitting.
    calls = []

    async def handler(request):
        calls.append(request)
        if len(calls) < 3:
            return await _reset(request)
        return web.Response(text=EVENT + "data: [DONE]\n\n")

    reply = _stream_with(handler)
    assert (reply.status, reply.text, reply.tokens, reply.retries) == ("ok", "hi", 1, 2)
    with pytest.raises(aiohttp.ClientConnectionError):  # a server that is gone ends it
        _stream_with(_reset)


def test_a_stream_cut_after_it_started_is_the_servers_answer():
    async def cut(request):
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(EVENT.encode())
        await asyncio.sleep(0.05)
        request.transport.close()
        return response

    reply = _stream_with(cut)
    assert reply.status == "error" and "stream cut" in reply.error and reply.retries == 0


def test_a_streamed_chunk_may_end_inside_a_character():
    async def split(request):
        response = web.StreamResponse()
        await response.prepare(request)
        body = EVENT.replace("hi", "h\u00e9").encode() + b"data: [DONE]\n\n"
        cut = body.index("\u00e9".encode()) + 1
        for part in (body[:cut], body[cut:]):
            await response.write(part)
            await asyncio.sleep(0.02)
        return response

    assert _stream_with(split).text == "h\u00e9"


def test_an_invalid_answer_the_server_said_it_might_write_is_counted_apart():
    # A non-strict schema served without its unenforced parts (calculate_area's `not: {}`
    # inside a `oneOf`) may get an invalid answer: DotLLM names the parts on the chunk that
    # finishes, and the sitting reports such answers apart from a broken constraint's.
    told = ('data: {"choices": [{"text": "{}", "finish_reason": "stop", "unenforced": '
            '{"keywords": ["not at /properties/a"], "valid": false}}], '
            '"usage": {"completion_tokens": 2}}\n\n')
    reply = _stream_with(_answer(told + "data: [DONE]\n\n"))
    assert reply.unenforced == ["not at /properties/a"]
    assert _stream_with(_answer(EVENT)).unenforced == []
    rows = [{"valid": True, "unenforced": True}, {"valid": False, "unenforced": True},
            {"valid": False, "unenforced": False}]
    assert serve._valid_share(rows) == "1/3 (33 %), 1 invalid as reported"
    assert serve._valid_share(rows[:1]) == "1/1 (100 %)"


def test_an_answer_not_streamed_is_read_whole_without_a_first_token_time():
    sent = []

    async def answer(request):
        sent.append(await request.json())
        return web.json_response({
            "choices": [{"text": "[1]", "finish_reason": "length", "unenforced": {
                "keywords": ["not at /items"], "valid": True}}],
            "usage": {"completion_tokens": 3}})

    reply = _stream_with(answer, stream=False)
    assert sent[0]["stream"] is False and "stream_options" not in sent[0]
    assert (reply.status, reply.text, reply.tokens, reply.finish) == ("ok", "[1]", 3, "length")
    assert reply.unenforced == ["not at /items"] and reply.e2e_s > 0
    assert math.isnan(reply.ttft_s) and reply.gaps_s == []
    refused = _stream_with(_answer("no such field", 400), stream=False)
    assert refused.status == "400" and "no such field" in refused.error


def test_every_equal_work_request_runs_the_same_steps():
    for name in scenarios.EQUAL_WORK:
        batch = scenarios.batch(name, 10, 32)
        assert len(batch) == 10
        for request in batch:
            assert request.steps == 32
            assert request.body.get("ignore_eos") or request.body.get("min_tokens") == 32
    mix = scenarios.batch("mix-20", 10, 32)
    assert sum(r.constrained for r in mix) == 2
    check = scenarios.batch("regex", 1, 32)[0].check
    assert check("2026-12-04T22:01") and not check("2026-13-04T22:01")
    order = scenarios.batch("schema-compact", 1, 32)[0]
    assert order.body["structured_outputs"]["disable_any_whitespace"] is True
    assert order.check('{"id":1,"customer":"a","status":"paid","express":true,'
                       '"items":[{"sku":"ABC-1234","quantity":2}]}')
    assert not order.check('{"id":1}') and not order.check("{not json")


def test_a_schema_mix_goes_round_its_schemas_and_its_twin_matches_its_lengths():
    schemas = [{"type": "integer"}, {"type": "string"}]
    mix = scenarios.schema_mix(schemas, 5)
    assert [r.body["structured_outputs"]["json"] for r in mix] == [*schemas * 2, schemas[0]]
    assert mix[0].check("7") and not mix[1].check("7") and mix[1].check('"7"')
    assert all(r.steps is None and r.constrained for r in mix)  # each until complete
    # (answers not served, or empty, have no twin)
    twin = scenarios.matched_free([3, 0, 9, 5], ["ok", "ok", "ok", "error"])
    assert [(r.steps, r.constrained, r.body) for r in twin] == [
        (3, False, {"ignore_eos": True}), (9, False, {"ignore_eos": True})]
    assert scenarios.baseline("schema-mix") == "schema-mix-free"
    assert scenarios.baseline("enum-array") == "free"


def test_a_step_is_set_against_its_own_baseline():
    def batch(scenario: str, step: float, repeat: int = 0) -> dict:
        return {"engine": "e", "scenario": scenario, "concurrency": 4, "repeat": repeat,
                "engine_itl_s": step}

    ratios = serve.step_ratios([
        batch("free", 2.0), batch("enum-array", 3.0), batch("schema-mix-free", 4.0),
        batch("schema-mix", 5.0), batch("schema-mix", 6.0, repeat=1)])
    assert ratios[("e", "enum-array", 4)] == [1.5]
    assert ratios[("e", "schema-mix", 4)] == [1.25]  # repeat 1 has no twin: no ratio
    assert ratios[("e", "free", 4)] == ratios[("e", "schema-mix-free", 4)] == [1.0]


@pytest.mark.server
def test_a_short_sitting_against_stock_vllm_writes_results_tables_and_plots(tmp_path):
    out = tmp_path / "sitting"
    code = serve.main([
        "--engines", "dotllm", "xgrammar", "--scenarios", "free", "enum-array", "mix-80",
        "schema", "schema-compact", "regex", "choice", "schema-mix", "unique",
        "--mix-schemas", "3", "--concurrency", "1", "4",
        "--tokens", "12", "--max-tokens", "200", "--repeats", "1", "--subsets",
        "Github_trivial", "Glaiveai2K", "--unique-schemas", "2", "--unique-together",
        "--unique-concurrency", "3",
        "--arrival-s", "0.2", "--out", str(out)])
    assert code == 0
    batches, unique = serve.load_results(out / "results.jsonl")
    seen = {(b["engine"], b["scenario"], b["concurrency"]) for b in batches}
    for engine in ("dotllm", "xgrammar"):
        for scenario in ("free", "enum-array", "mix-80", "schema", "schema-compact", "regex",
                         "choice", "schema-mix", "schema-mix-free"):
            assert {(engine, scenario, 1), (engine, scenario, 4)} <= seen
    for b in batches:
        assert b["arrival_s"] == 0.2
        assert len(b["tokens"]) == b["concurrency"] and b["wall_s"] > 0
        assert set(b["status"]) == {"ok"}, b["errors"]
        assert b["engine_itl_s"] > 0
        assert all(0 < t < b["wall_s"] for t in b["ttft_s"])
        assert len(b["unenforced"]) == b["concurrency"]
        assert b["engine"] == "dotllm" or not any(b["unenforced"])
        if b["scenario"] in scenarios.EQUAL_WORK:
            assert b["tokens"] == [12] * b["concurrency"] and not b["errors"]
            assert 0 < b["rows_per_step"] <= b["concurrency"]
            assert b["client_itl_s"][0] <= b["client_itl_s"][2]
        elif b["scenario"] == "schema-mix-free":  # as long as its mix's answers, no longer
            mix, = [m for m in batches if m["scenario"] == "schema-mix" and all(
                m[k] == b[k] for k in ("engine", "concurrency", "repeat"))]
            assert b["tokens"] == mix["tokens"] and not b["errors"]
        elif b["scenario"] == "schema-mix":  # real schemas: not every answer ends
            assert False not in b["valid"], (b["engine"], b["valid"])
        elif b["engine"] == "dotllm" or b["scenario"] != "schema":
            # (stock's free whitespace may fill max_tokens on `schema`: not ended)
            assert all(b["valid"]), (b["engine"], b["scenario"], b["valid"])
    compact = [b for b in batches if b["scenario"] == "schema-compact"]
    assert {b["note"] for b in compact if b["engine"] == "xgrammar"} == {
        "stock: disable_any_whitespace server-wide"}
    assert {b["note"] for b in compact if b["engine"] == "dotllm"} == {""}
    # Real schemas: 2 of each subset in one batch, cold then warm, per engine; DotLLM serves
    # and ends them validly.
    assert len(unique) == 2 * 2 * 2 * 2
    assert {r["subset"] for r in unique} == {"Github_trivial", "Glaiveai2K"}
    ours = [r for r in unique if r["engine"] == "dotllm"]
    assert all(r["status"] == "ok" for r in ours), [r["error"] for r in ours]
    assert all(r["valid"] for r in ours if r["ended"])
    assert {r["phase"] for r in ours} == {"cold", "warm"}
    summary = (out / "summary.md").read_text()
    for heading in ("Equal work: the cost of a step (requests arriving evenly over 0.2 s)",
                    "Documents", "Real schemas"):
        assert heading in summary
    assert "| dotllm | free | 4 |" in summary and "1.00 [1.00-1.00]" in summary
    assert "| dotllm | schema-mix-free | 4 |" in summary
    for name in ("step", "step-ratio", "ttft", "throughput", "unique-ttft", "coverage"):
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and 5_000 < len(png) < 300_000, name
    # The report is reproducible from the results alone.
    (out / "summary.md").unlink()
    assert serve.main(["--report", str(out)]) == 0
    assert (out / "summary.md").read_text() == summary
    assert json.loads((out / "results.jsonl").read_text().splitlines()[0])["kind"] == "batch"
    # One arrival setting a results file: another is refused before anything is measured.
    with pytest.raises(SystemExit) as refused:
        serve.main(["--engines", "dotllm", "--scenarios", "free", "--out", str(out)])
    assert refused.value.code == 2  # argparse's usage error, not the report's
