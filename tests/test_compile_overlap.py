"""compile_overlap: vLLM's schedulers (sync and async) with DotLLM's overlap mixed in,
driven step by step in process: a request prefills while its constraint is being made,
and only the step that samples waits for it."""

from __future__ import annotations

import re
from concurrent.futures import Future

import pytest
import regex as partial_regex
import torch
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams, StructuredOutputsParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager
from vllm.v1.structured_output.backend_types import StructuredOutputOptions

from dotllm.vllm_ext import compile_overlap
from dotllm.vllm_ext.patching import mixing_into_scheduler, with_mixin

BLOCK = 16
BUDGET = 128  # tokens a step
REGEX = "[0-9]{3}"
HASH = get_hash_fn_by_name("sha256")


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def make_scheduler(request, embedded_model, backend):
    """vLLM's scheduler (or its async one) with the overlap, `num_blocks` of KV cache."""
    return lambda num_blocks=200: _scheduler(request.param, num_blocks, embedded_model,
                                             backend)


@pytest.fixture
def scheduler(make_scheduler):
    return make_scheduler()


def _scheduler(async_scheduling: bool, num_blocks: int, embedded_model, backend,
               mixins: tuple[type, ...] = (compile_overlap.CompileOverlap,),
               max_num_seqs: int = 8, budget: int = BUDGET):
    """vLLM's scheduler (sync or async) around `backend`, with `mixins` (the innermost
    first), `num_blocks` of KV cache."""
    config = VllmConfig(
        scheduler_config=SchedulerConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=1024,
            enable_chunked_prefill=True, async_scheduling=async_scheduling,
            is_encoder_decoder=False),
        model_config=ModelConfig(model=str(embedded_model), dtype="float32", seed=0,
                                 skip_tokenizer_init=True),
        cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=True))
    config.cache_config.num_gpu_blocks = num_blocks
    kv = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["layer"], FullAttentionSpec(
            block_size=BLOCK, num_kv_heads=1, head_size=1, dtype=torch.float32))])
    manager = StructuredOutputManager(config)
    manager.backend = backend
    base = cls = AsyncScheduler if async_scheduling else Scheduler
    for mixin in mixins:
        cls = with_mixin(mixin, cls)
    assert issubclass(cls, base)
    init_none_hash(HASH)
    return cls(vllm_config=config, kv_cache_config=kv, log_stats=True,
               structured_output_manager=manager, block_size=BLOCK)


def make_request(request_id: str, prompt_len: int, constrained: bool = True,
                 max_tokens: int = 3, compiling: bool = True, seed: int | None = None
                 ) -> tuple[Request, Future | None]:
    """A request; a constrained one's grammar is made later, and `compiling` says that the
    backend told it waits for a compile (most constraints are ready in milliseconds)."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=seed,
                            structured_outputs=(StructuredOutputsParams(regex=REGEX)
                                                if constrained else None))
    base = 1000 + 100 * int(request_id.strip("r") or 0)
    request = Request(request_id=request_id, prompt_token_ids=list(range(base, base + prompt_len)),
                      sampling_params=params, pooling_params=None,
                      block_hasher=get_request_block_hasher(BLOCK, HASH))
    grammar = None
    if constrained:
        grammar = Future()  # what vLLM's grammar thread pool hands over: made later
        request.structured_output_request.grammar = grammar
        if compiling:
            compile_overlap.mark(request.structured_output_request)
    return request, grammar


@pytest.fixture(scope="module")
def digit(tokenizer) -> int:
    return tokenizer.encode("7", add_special_tokens=False)[0]


def step(scheduler, token: int) -> dict[str, int]:
    """One step: schedule, and `token` sampled for every request past its prompt."""
    out = scheduler.schedule()
    ids = list(out.num_scheduled_tokens)
    sampled = [[] if scheduler.requests[i].is_prefill_chunk else [token] for i in ids]
    if any(sampled):
        scheduler.get_grammar_bitmask(out)  # the sampling step needs the grammar
    scheduler.update_from_output(out, ModelRunnerOutput(
        req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
        sampled_token_ids=sampled))
    return dict(out.num_scheduled_tokens)


def ready(backend, grammar: Future) -> None:
    grammar.set_result(backend.compile_grammar(StructuredOutputOptions.REGEX, REGEX))


def prefilled(backend) -> float:
    return backend.metrics.prefill_while_compiling._value.get()


def test_the_prompt_prefills_while_the_grammar_is_made(scheduler, backend, digit):
    before = prefilled(backend)
    request, grammar = make_request("r1", 300)
    scheduler.add_request(request)
    assert step(scheduler, digit) == {"r1": BUDGET}  # stock vLLM: nothing, until it is ready
    assert step(scheduler, digit) == {"r1": BUDGET}
    assert step(scheduler, digit) == {"r1": 300 - 1 - 2 * BUDGET}  # all but the last token
    assert step(scheduler, digit) == {} and request.num_computed_tokens == 299
    assert prefilled(backend) - before == 299
    ready(backend, grammar)
    assert step(scheduler, digit) == {"r1": 1}  # the step that samples
    assert request.num_output_tokens == 1 and request.status == RequestStatus.RUNNING


def test_a_ready_grammar_and_free_requests_are_scheduled_as_before(scheduler, backend,
                                                                   digit):
    constrained, grammar = make_request("r1", 100)
    ready(backend, grammar)
    free, _ = make_request("r2", 20, constrained=False)
    for request in (constrained, free):
        scheduler.add_request(request)
    assert step(scheduler, digit) == {"r1": 100, "r2": 20}


@pytest.mark.parametrize("why", ["ready in milliseconds", "seeded, on a CPU"])
def test_a_constraint_not_waiting_for_a_compile_is_held_as_in_vllm(scheduler, backend, digit,
                                                                   why):
    """Splitting the prompt would cost a step for a constraint about to be ready; and vLLM
    0.26's CPU runner cannot take a seeded request's partial prefill."""
    if why == "ready in milliseconds":
        request, grammar = make_request("r1", 100, compiling=False)
    else:
        request, grammar = make_request("r1", 100, seed=7)
    scheduler.add_request(request)
    assert step(scheduler, digit) == {}
    ready(backend, grammar)
    assert step(scheduler, digit) == {"r1": 100}


def test_the_cap_is_asked_of_every_request_only_where_a_request_has_no_output(
        scheduler, digit):
    """A batch all in decode is spared the cap's call a request; a request
    waiting, or still in its prompt, turns it back on, and it still holds that prompt
    short of the step that samples."""
    calls = []
    split = type(scheduler)._mamba_block_aligned_split
    scheduler._mamba_block_aligned_split = lambda request, *args: (
        calls.append(request.request_id) or split(scheduler, request, *args))
    decoding, _ = make_request("r1", 20, constrained=False, max_tokens=50)
    scheduler.add_request(decoding)
    step(scheduler, digit)  # its prompt, and its first token
    step(scheduler, digit)
    assert decoding.num_output_tokens == 2 and not scheduler.need_mamba_block_aligned_split
    calls.clear()
    step(scheduler, digit)
    assert calls == []
    compiling, _ = make_request("r2", 300)
    scheduler.add_request(compiling)
    assert step(scheduler, digit) == {"r1": 1, "r2": BUDGET - 1}
    assert scheduler.need_mamba_block_aligned_split and calls == ["r1", "r2"]
    while compiling.num_computed_tokens < 299:
        assert step(scheduler, digit).get("r2", 0) <= 299 - BUDGET + 1
    assert step(scheduler, digit) == {"r1": 1}  # r2's last token waits for its grammar
    assert scheduler.need_mamba_block_aligned_split


def test_a_pending_request_with_no_prompt_left_does_not_hold_up_the_queue(scheduler, digit):
    short, _ = make_request("r1", 1)  # nothing to prefill before its last token
    free, _ = make_request("r2", 20, constrained=False)
    for request in (short, free):
        scheduler.add_request(request)
    assert step(scheduler, digit) == {"r2": 20}
    assert short.status == RequestStatus.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR


def test_a_constraint_failing_mid_prefill_ends_the_request_and_frees_its_blocks(
        scheduler, digit):
    request, grammar = make_request("r1", 300)
    scheduler.add_request(request)
    step(scheduler, digit)
    assert scheduler.kv_cache_manager.usage > 0
    grammar.set_exception(ValueError("the compile timed out"))
    assert step(scheduler, digit) == {}
    assert request.status == RequestStatus.FINISHED_ERROR
    assert "r1" not in scheduler.requests and scheduler.kv_cache_manager.usage == 0
    free, _ = make_request("r2", 20, constrained=False)
    scheduler.add_request(free)
    assert step(scheduler, digit) == {"r2": 20}


def test_a_request_preempted_while_compiling_prefills_again_and_waits(make_scheduler,
                                                                     backend, digit):
    scheduler = make_scheduler(12)  # 192 token slots: the two cannot both keep theirs
    free, _ = make_request("r2", 60, constrained=False, max_tokens=200)
    scheduler.add_request(free)
    step(scheduler, digit)
    waiting, grammar = make_request("r1", 100)  # the newest: the one vLLM preempts
    scheduler.add_request(waiting)
    step(scheduler, digit)
    assert waiting.num_computed_tokens == 99
    for _ in range(100):
        step(scheduler, digit)
        if waiting.status == RequestStatus.PREEMPTED:
            break
    assert waiting.status == RequestStatus.PREEMPTED and waiting.num_computed_tokens == 0
    scheduler.finish_requests(["r2"], RequestStatus.FINISHED_ABORTED)
    while waiting.num_computed_tokens < 99:
        assert step(scheduler, digit).get("r1", 0) <= 99
    assert step(scheduler, digit) == {}  # still compiling: the last token waits
    ready(backend, grammar)
    assert step(scheduler, digit) == {"r1": 1}


def waiting_behind_prefill(scheduler, request_id: str, prompt_len: int, **kwargs):
    """A request whose grammar thread waits for its index behind the prompt's prefill
    (`prefill_waiter`'s wait, in a thread of its own), added to `scheduler`."""
    import threading
    import time

    request, grammar = make_request(request_id, prompt_len, compiling=False, **kwargs)
    wait = compile_overlap.prefill_waiter(scheduler.structured_output_manager, request)
    assert wait is not None
    thread = threading.Thread(target=wait, args=(Future(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not compile_overlap._compiling(request):  # marked by the waiting thread
        assert time.monotonic() < deadline
        time.sleep(0.001)
    scheduler.add_request(request)
    return request, grammar, thread


def test_a_wait_behind_the_prefill_ends_when_the_sampling_step_is_next(scheduler, backend,
                                                                       digit):
    """The tiered engine's wait for an index ends at the step that computes the prompt's
    last token but one: the next samples, on llguidance if the index is not there."""
    request, grammar, thread = waiting_behind_prefill(scheduler, "r1", 300)
    assert step(scheduler, digit) == {"r1": BUDGET}
    assert step(scheduler, digit) == {"r1": BUDGET}
    thread.join(0.2)
    assert thread.is_alive()  # still waiting: prompt left
    assert step(scheduler, digit) == {"r1": 300 - 1 - 2 * BUDGET}
    thread.join(10)
    assert not thread.is_alive()
    ready(backend, grammar)  # what the grammar thread hands over then
    assert step(scheduler, digit) == {"r1": 1}


@pytest.mark.parametrize("why", ["seeded, on a CPU", "aborted"])
def test_a_wait_behind_the_prefill_ends_where_there_is_none(scheduler, digit, why):
    if why == "aborted":
        request, _, thread = waiting_behind_prefill(scheduler, "r1", 300)
        step(scheduler, digit)
        scheduler.finish_requests(["r1"], RequestStatus.FINISHED_ABORTED)
    else:  # vLLM 0.26's CPU runner cannot take its partial prefill
        request, _, thread = waiting_behind_prefill(scheduler, "r1", 300, seed=7)
        assert step(scheduler, digit) == {}
    thread.join(10)
    assert not thread.is_alive()


def test_only_a_prompt_longer_than_a_step_waits_behind_its_prefill(scheduler,
                                                                   embedded_model, backend):
    manager = scheduler.structured_output_manager
    assert compile_overlap.prefill_waiter(manager, make_request("r1", BUDGET)[0]) is None
    assert compile_overlap.prefill_waiter(manager, make_request("r2", BUDGET + 1)[0])
    plain = _scheduler(False, 200, embedded_model, backend, mixins=())  # no overlap here
    assert compile_overlap.prefill_waiter(plain.structured_output_manager,
                                          make_request("r3", 300)[0]) is None


def test_a_users_own_scheduler_is_left_alone_and_off_means_off(monkeypatch):
    from types import SimpleNamespace

    class Mine(Scheduler):
        pass

    pick = mixing_into_scheduler(compile_overlap.CompileOverlap)(
        lambda config: config.chosen)
    overlapped = pick(SimpleNamespace(scheduler_cls=None, chosen=AsyncScheduler))
    assert issubclass(overlapped, compile_overlap.CompileOverlap)
    assert issubclass(overlapped, AsyncScheduler)
    assert pick(SimpleNamespace(scheduler_cls="my.Mine", chosen=Mine)) is Mine
    monkeypatch.setenv("DOTLLM_COMPILE_OVERLAP", "off")
    assert compile_overlap.apply(in_launcher=False) is False


# --- end to end: a server whose requests wait for their index ---

@pytest.fixture(scope="module")
def waiting_server(embedded_model, tmp_path_factory):
    from tests.conftest import start_dotllm, stop_server

    server = start_dotllm(tmp_path_factory, extra_args=(
        "--dotllm-constraint-engine", "outlines", "--dotllm-compile-timeout", "8"))
    yield server
    stop_server(server)


def long_prompt(words: int) -> str:
    import uuid

    return " ".join(f"{uuid.uuid4().hex[:6]}" for _ in range(words))  # no prefix cache hit


@pytest.mark.server
def test_a_long_prompt_prefills_while_its_index_compiles(waiting_server):
    import openai

    from dotllm.embedded_model import NAME

    client = openai.OpenAI(base_url=waiting_server.base_url, api_key="x", max_retries=0)
    name = "dotllm_constraint_prefill_tokens_while_compiling_total"
    before = waiting_server.metrics().get(name, 0)
    pattern = "[a-z]{99}"  # ~1 s to compile here, and never compiled before on this server
    reply = client.completions.create(
        model=NAME, prompt=long_prompt(400), max_tokens=120, temperature=1.0,
        extra_body={"structured_outputs": {"regex": pattern}})
    assert re.fullmatch(pattern, reply.choices[0].text)
    assert waiting_server.metrics().get(name, 0) - before > 100
    free = client.completions.create(model=NAME, prompt=long_prompt(50), max_tokens=5)
    assert free.usage.completion_tokens == 5


@pytest.mark.server
def test_a_compile_that_times_out_mid_prefill_is_a_400_and_frees_the_request(
        waiting_server):
    import openai

    from dotllm.embedded_model import NAME

    client = openai.OpenAI(base_url=waiting_server.base_url, api_key="x", max_retries=0)
    name = "dotllm_constraint_prefill_tokens_while_compiling_total"
    before = waiting_server.metrics().get(name, 0)
    with pytest.raises(openai.BadRequestError, match="took longer than 8 s"):
        client.completions.create(  # a compile of ~20 s here, alone
            model=NAME, prompt=long_prompt(400), max_tokens=5,
            extra_body={"structured_outputs": {"regex": "[a-z0-9 ]{500}"}})
    after = waiting_server.metrics()
    assert after.get(name, 0) > before  # it had prefilled when the compile gave up
    for gauge in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
        assert sum(v for k, v in after.items() if k.startswith(gauge)) == 0, gauge
    reply = client.completions.create(
        model=NAME, prompt="x", max_tokens=8,
        extra_body={"structured_outputs": {"regex": "[0-9]{3}"}})
    assert re.fullmatch("[0-9]{3}", reply.choices[0].text)


@pytest.mark.server
def test_a_client_gone_while_its_request_waits_for_a_compile_frees_everything(
        waiting_server):
    """The stream is dropped mid-prefill, its compile still running: the request goes, its
    KV cache with it, and the server serves the next one."""
    import json
    import socket
    import time
    from urllib.parse import urlsplit

    import openai

    from dotllm.embedded_model import NAME

    # A raw connection: a stream's response start waits for its first event (stream_errors),
    # which waits for the compile, so the client leaves before any header arrives.
    body = json.dumps({"model": NAME, "prompt": long_prompt(400), "max_tokens": 5,
                       "stream": True, "structured_outputs": {"regex": "[a-z]{420}"}})
    url = urlsplit(waiting_server.url)
    name = "dotllm_constraint_prefill_tokens_while_compiling_total"
    prefilled, sampled = waiting_server.total(name), waiting_server.total(
        "vllm:generation_tokens_total")
    with socket.create_connection((url.hostname, url.port), timeout=60) as conn:
        conn.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\n"
                      "Content-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
        deadline = time.monotonic() + 60
        while waiting_server.total(name) == prefilled:
            assert time.monotonic() < deadline, "the request never started its prefill"
            time.sleep(0.05)
    deadline = time.monotonic() + 30
    while True:
        after = waiting_server.metrics()
        left = [sum(v for k, v in after.items() if k.startswith(gauge))
                for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                              "vllm:kv_cache_usage_perc")]
        if left == [0, 0, 0]:
            break
        assert time.monotonic() < deadline, left
        time.sleep(0.2)
    # it went before its compile ended (~4 s here): it never sampled
    assert waiting_server.total("vllm:generation_tokens_total") == sampled
    # (its compile may still hold this server's one worker: the next request is a free one)
    client = openai.OpenAI(base_url=waiting_server.base_url, api_key="x", max_retries=0)
    free = client.completions.create(model=NAME, prompt=long_prompt(50), max_tokens=5)
    assert free.usage.completion_tokens == 5


@pytest.fixture(scope="module")
def tiered_server(embedded_model, tmp_path_factory):
    """The default engine, with steps of 256 tokens: a prompt of 2,500 prefills in 10."""
    from tests.conftest import start_dotllm, stop_server

    server = start_dotllm(tmp_path_factory, extra_args=("--max-num-batched-tokens", "256"))
    yield server
    stop_server(server)


@pytest.mark.server
def test_a_long_prompt_waits_for_its_index_behind_its_prefill(tiered_server):
    """A compile shorter than the prompt's prefill: the request starts on its index, with
    no llguidance and no hand-over; a longer one: on llguidance when its prefill ends, as
    a short prompt would at once."""
    import uuid

    import openai

    from dotllm.embedded_model import NAME

    client = openai.OpenAI(base_url=tiered_server.base_url, api_key="x", max_retries=0)
    client.completions.create(  # the compile worker starts (seconds) with its first compile
        model=NAME, prompt="x", max_tokens=2,
        extra_body={"structured_outputs": {"regex": "[0-9]{2}"}})
    tiered_server.wait_for_compiles()
    cases = [(f"{uuid.uuid4().hex[:6]}[0-9]{{3}}", "index"),  # ~0.02 s to compile here
             (f"{uuid.uuid4().hex[:6]}[a-z]{{400}}", "llguidance")]  # ~3 s; prefill ~0.4
    for pattern, tier in cases:
        before = tiered_server.metrics()
        reply = client.completions.create(
            model=NAME, prompt=long_prompt(500), max_tokens=4,
            extra_body={"structured_outputs": {"regex": pattern}})
        assert reply.usage.prompt_tokens > 2000
        assert partial_regex.fullmatch(pattern, reply.choices[0].text, partial=True)
        after = tiered_server.metrics()
        for name, grew in [(f'dotllm_constraint_prefill_waits_total{{outcome="{tier}"}}', 1),
                           (f'dotllm_constraint_tier_start_total{{tier="{tier}"}}', 1),
                           ("dotllm_constraint_tier_start_total", 1)]:
            total = sum(v for k, v in after.items() if k.startswith(name))
            total -= sum(v for k, v in before.items() if k.startswith(name))
            assert total == grew, (name, total)
        # the whole prompt but its last token when the prefill ended first
        prefilled = "dotllm_constraint_prefill_tokens_while_compiling_total"
        assert after[prefilled] - before.get(prefilled, 0) > (2000 if tier == "llguidance"
                                                              else 0)
