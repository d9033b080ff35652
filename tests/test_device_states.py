"""Device states (kernels/states.py, dotllm.mask_plan, the `device_states` patch): requests
on an index advanced on the device from each sampled token, while the host accepts one
step behind, mask exactly what the host would; vLLM's async scheduler then samples a
step without waiting for the host, where every constrained request in it is held there.

On CPU (CI): the torch ops, and the Triton ones through the interpreter. GPU-marked: the
same on CUDA.
"""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from vllm.sampling_params import SamplingParams, StructuredOutputsParams
from vllm.v1.core.kv_cache_utils import get_request_block_hasher
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from bench.jsonschemabench import load
from dotllm.compiler.compiled import CompiledIndex
from dotllm.guide import Guide
from dotllm.kernels import arena as arena_module
from dotllm.kernels import states as device_states
from dotllm.kernels.arena import DEVICE_STATE, MaskArena
from dotllm.mask_plan import BLOB_STEPS, RowPlanner
from dotllm.vllm_ext import device_states as device_states_patch
from dotllm.vllm_ext import row_plans
from dotllm.vllm_ext.backend import DotllmGrammar
from dotllm.vllm_ext.compile_overlap import CompileOverlap
from dotllm.vllm_ext.row_plans import planner_of
from tests.conftest import (
    check_answer,
    complete_constrained,
    grammar_on_index,
    grammar_on_llguidance,
    run_under_triton_interpreter,
    start_dotllm,
    stop_server,
)
from tests.test_compile_overlap import BLOCK, HASH, _scheduler
from tests.test_kernels import random_logits, reference

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
REGEXES = (
    r"[a-z]{1,6}( [a-z]{1,6}){0,4}",
    r'\{"name": "[A-Za-z ]{0,12}", "age": [0-9]{1,3}\}',
    r"(yes|no|maybe)( (yes|no|maybe)){0,6}",
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}",
)


@pytest.fixture(scope="module")
def indexes(vocabulary) -> list[CompiledIndex]:
    return [CompiledIndex.build(r, vocabulary) for r in REGEXES]


def _devices():
    if INTERPRETING:  # the run test_triton_ops_under_the_interpreter starts
        return [pytest.param("cpu", id="triton-interpreter")]
    return [pytest.param("cpu", id="torch-cpu"),
            pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


@pytest.mark.skipif(INTERPRETING, reason="this is that run")
def test_triton_ops_under_the_interpreter():
    run_under_triton_interpreter(__file__, "triton-interpreter")


def _implementations():
    """(implementation, device) for every implementation a device runs."""
    if INTERPRETING:
        return [pytest.param("triton", "cpu", id="triton-interpreter")]
    return [pytest.param("torch", "cpu", id="torch-cpu"),
            *(pytest.param(name, "cuda", id=f"{name}-cuda", marks=pytest.mark.gpu)
              for name in ("cuda", "triton", "torch"))]


def test_the_first_implementation_a_device_runs_is_the_one_used():
    names = device_states.implementations(torch.device("cpu"))
    assert names == (["triton", "torch"] if INTERPRETING else ["torch"])
    assert device_states.implementation(torch.device("cpu")).__name__.endswith(names[0] + "_states")


@pytest.mark.gpu
def test_cuda_uses_the_extension_where_it_is_built():
    pytest.importorskip("dotllm._states_cuda")
    assert device_states.implementations(torch.device("cuda"))[0] == "cuda"


@pytest.mark.parametrize(("name", "device"), _implementations())
def test_ops_move_and_resolve_states_as_the_transition_table(name, device, indexes):
    """Several blobs in one buffer at odd offsets; tokens allowed and not (a token a state
    does not allow leaves it as it is)."""
    if name not in device_states.implementations(torch.device(device)):
        pytest.skip(f"no {name} implementation here")
    impl = device_states.named(name)
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    parts, bases, offset = [np.zeros(3, np.int32)], [], 3
    for compiled in indexes:
        t = compiled.transitions
        slots = rng.integers(0, 1000, t.num_states).astype(np.int32)
        blob = device_states.blob(t.offsets, t.tokens, t.targets, slots)
        parts.append(blob)
        bases.append((offset, slots))
        offset += len(blob)
    buffer = torch.from_numpy(np.concatenate(parts)).to(device)
    n = 64
    which = rng.integers(0, len(indexes), n)
    state = np.array([rng.integers(indexes[w].transitions.num_states) for w in which])
    tokens, expected = [], []
    for w, s in zip(which, state, strict=True):
        t = indexes[w].transitions
        allowed = t.tokens_from(s)
        token = (int(rng.choice(allowed)) if len(allowed) and rng.random() < 0.8
                 else int(rng.integers(indexes[w].table.rows.shape[1] * 32)))
        tokens.append(token)
        nxt = t.next_state(s, token)
        expected.append(s if nxt is None else nxt)
    slot_of = rng.permutation(2 * n)[:n].astype(np.int32)  # state slots, scattered
    base_t = torch.zeros(2 * n, dtype=torch.int32)
    state_t = torch.zeros(2 * n, dtype=torch.int32)
    base_t[slot_of] = torch.tensor([bases[w][0] for w in which], dtype=torch.int32)
    state_t[slot_of] = torch.from_numpy(state.astype(np.int32))
    base_t, state_t = base_t.to(device), state_t.to(device)
    k = torch.from_numpy(slot_of).to(device)
    out = torch.full((n + 5,), -9, dtype=torch.int32, device=device)
    positions = torch.from_numpy(rng.permutation(n + 5)[:n].astype(np.int32)).to(device)
    impl.resolve(buffer, base_t, state_t, k, out, positions)
    got = out.cpu().numpy()[positions.cpu().numpy()]
    assert got.tolist() == [int(bases[w][1][s]) for w, s in zip(which, state, strict=True)]
    rows = torch.from_numpy(rng.permutation(n).astype(np.int32))
    for token_dtype in (torch.int64, torch.int32):  # vLLM's runners hand over either
        sampled = torch.zeros((n, 2), dtype=token_dtype)
        sampled[rows.long(), 0] = torch.tensor(tokens, dtype=token_dtype)
        moved = state_t.clone()
        impl.advance(buffer, base_t, moved, k, sampled.to(device), rows.to(device),
                     device_states.search_steps(indexes[0].table.rows.shape[1] * 32))
        assert moved.cpu()[slot_of].tolist() == expected, token_dtype


class _Walker:
    """A request walking an index: `truth` accepts each token when sampled, `host` one
    step late (vLLM's async scheduling)."""

    def __init__(self, name: str, compiled: CompiledIndex, eos: int):
        self.name, self.compiled = name, compiled
        self.truth = Guide(compiled, eos)
        self.host = Guide(compiled, eos)
        self.in_flight: int | None = None

    def catch_up(self) -> None:
        if self.in_flight is not None:
            assert self.host.accept_tokens([self.in_flight])
            self.in_flight = None


def _blob_words(compiled: CompiledIndex) -> int:
    return (device_states.HEADER + 2 * compiled.num_states + 1
            + 2 * len(compiled.transitions.tokens))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("budget", ["unbounded", "pieces"])
def test_random_walks_mask_as_the_host_would(device, budget, indexes, vocabulary):
    """Requests come and go over four indexes through a planner too small for all of
    them at once (tables evicted and uploaded again, blobs refused, state slots run out;
    with `pieces`, steps that may send less than a blob: tables wait for a later step,
    blobs go in pieces): each step every row masks what the request's true state allows,
    whether the device names it or the host (which then catches up first, as vLLM's
    deferred step does)."""
    seed = int.from_bytes(os.urandom(4), "little")  # in every failure's message
    rng = random.Random(seed)
    eos, words = vocabulary.eos_token_id, indexes[0].table.rows.shape[1]
    rows_needed = sorted(len(c.table.rows) for c in indexes)
    blob_needed = sorted(_blob_words(c) for c in indexes)
    upload = 2**40 if budget == "unbounded" else 4 * blob_needed[0] // 3
    planner = RowPlanner(words, table_slots=rows_needed[-1] + rows_needed[-2], max_rows=8,
                         blob_words=blob_needed[-1] + blob_needed[0], state_slots=5,
                         step_upload_bytes=upload)
    arena = MaskArena(torch.device(device), words)
    walkers: list[_Walker] = []
    served = {"device": 0, "host": 0}
    for step in range(150):
        while len(walkers) < 7 and rng.random() < 0.5:
            walkers.append(_Walker(f"r{step}-{len(walkers)}", rng.choice(indexes), eos))
        if step == 75:
            planner.release_all()  # vLLM dropped in-flight tokens: states set again
        if not all(planner.holds(w.name, w.compiled.table) for w in walkers):
            for w in walkers:  # a deferred step: the host accepts the last tokens first
                w.catch_up()
        plan = planner.start()
        for w in walkers:
            in_step = w.in_flight is None
            if plan.device_state_row(w.name, w.compiled, w.host.state if in_step else None):
                served["device"] += 1
                continue
            planner.release(w.name)
            plan.table_row(*w.host.table_row())
            served["host"] += 1
        step_plan = plan.finish()
        batch = len(walkers) + 2
        targets = np.array(rng.sample(range(batch), len(walkers)), dtype=np.int32)
        logits = random_logits(batch, words * 32, torch.float32, device,
                               torch.Generator().manual_seed(step))
        masks = torch.from_numpy(np.stack([w.compiled.mask_row(w.truth.state)
                                           for w in walkers])) if walkers else None
        expected = (reference(logits, masks, torch.from_numpy(targets), None) if walkers
                    else logits.double().cpu())
        arena.apply(logits, step_plan, targets)
        assert torch.equal(logits.double().cpu(), expected), (seed, step)
        sampled = torch.full((batch, 1), -1, dtype=torch.int32)
        ended = []
        for w, row in zip(walkers, targets, strict=True):
            allowed = w.compiled.transitions.tokens_from(w.truth.state)
            if w.compiled.is_final(w.truth.state) and (not len(allowed) or rng.random() < 0.2):
                token = eos
            else:
                token = int(rng.choice(allowed))
            sampled[row, 0] = token
            assert w.truth.accept_tokens([token])
            w.catch_up()
            w.in_flight = token
            if token == eos:
                ended.append(w)
        arena.advance(sampled.to(device))
        for w in ended:
            walkers.remove(w)
            planner.release(w.name)
    # Both paths taken (the device's share varies with the seed: 74-239 of ~850 rows
    # over seeds 30-36 with `pieces`).
    assert served["device"] > 30 and served["host"] > 10, (seed, served)


@pytest.mark.parametrize("device", _devices())
def test_a_step_equal_to_the_last_launches_again_over_the_states_it_moved(
        device, indexes, vocabulary, monkeypatch):
    """The engine core sends the same plan again while every row stays on the device
    (kernels.arena._LastStep): the worker launches over the last step's index tensors,
    and each row's mask is still its state's after the states moved. Steps that differ
    (other logits rows, a request ended, one added) take the full path."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    eos, words = vocabulary.eos_token_id, indexes[0].table.rows.shape[1]
    planner = RowPlanner(words, table_slots=sum(len(c.table.rows) for c in indexes),
                         max_rows=8, blob_words=sum(_blob_words(c) for c in indexes),
                         state_slots=8, step_upload_bytes=2**40)
    arena = MaskArena(torch.device(device), words)
    repeats = []
    repeated_by = arena_module._LastStep.repeated_by
    monkeypatch.setattr(arena_module._LastStep, "repeated_by",
                        lambda *a: repeats.append(repeated_by(*a)) or repeats[-1])
    walkers = [_Walker(f"r{i}", rng.choice(indexes), eos) for i in range(5)]
    batch = 8
    targets = np.array(rng.sample(range(batch), len(walkers)), dtype=np.int32)
    for step in range(60):
        if step % 7 == 6:  # the batch's order changed: other logits rows
            targets = np.array(rng.sample(range(batch), len(walkers)), dtype=np.int32)
        plan = planner.start()
        for w in walkers:
            assert plan.device_state_row(w.name, w.compiled,
                                         w.host.state if w.in_flight is None else None)
        step_plan = plan.finish()
        logits = random_logits(batch, words * 32, torch.float32, device,
                               torch.Generator().manual_seed(seed + step))
        masks = torch.from_numpy(np.stack([w.compiled.mask_row(w.truth.state)
                                           for w in walkers]))
        expected = reference(logits, masks, torch.from_numpy(targets), None)
        assert arena.apply(logits, step_plan, targets) == (0, len(walkers), 0)
        assert torch.equal(logits.double().cpu(), expected), (seed, step)
        sampled = torch.full((batch, 1), -1, dtype=torch.int32)
        for i, (w, row) in enumerate(zip(walkers, targets, strict=True)):
            allowed = w.compiled.transitions.tokens_from(w.truth.state)
            if w.compiled.is_final(w.truth.state) and (not len(allowed) or rng.random() < 0.05):
                token = eos
            else:
                token = int(rng.choice(allowed))
            ends = token == eos
            sampled[row, 0] = token
            assert w.truth.accept_tokens([token])
            w.catch_up()
            w.in_flight = token
            if ends:  # a new request in its place: its state is set by the next plan
                planner.release(w.name)
                walkers[i] = _Walker(f"r{i}-{step}", rng.choice(indexes), eos)
        arena.advance(sampled.to(device))
    # Steps repeat between requests set anew (two full steps each: its state set, then
    # the first with nothing to write).
    assert repeats.count(True) > 10, (seed, repeats.count(True))
    assert repeats.count(False) >= 2, (seed, repeats)


def test_a_table_with_live_device_states_is_never_evicted(indexes):
    a, b = indexes[0], indexes[2]
    words = a.table.rows.shape[1]
    planner = RowPlanner(words, table_slots=max(len(a.table.rows), len(b.table.rows)),
                         max_rows=4, blob_words=10**8, state_slots=4)
    plan = planner.start()
    assert plan.device_state_row("r1", a, a.initial_state)
    first = plan.finish()
    assert first.slots.tolist() == [DEVICE_STATE] and first.states.tolist() == [0]
    assert [x.tolist() for x in first.state_inits] == [[0], [0], [a.initial_state]]
    assert len(first.uploads) == 1 and len(first.blob_uploads) == 1
    plan = planner.start()
    assert not plan.device_state_row("r2", b, b.initial_state)  # a is pinned by r1
    plan.table_row(b.table, 0)  # the row travels with the step
    assert plan.finish().uploads == []
    plan = planner.start()
    assert plan.device_state_row("r1", a, None)  # r1 goes on: nothing sent but its slot
    again = plan.finish()
    assert again.state_inits is None and again.uploads == [] and again.blob_uploads == []
    assert again.nbytes == 8
    planner.release("r1")
    plan = planner.start()
    assert plan.device_state_row("r2", b, b.initial_state)  # a goes now
    assert len(plan.finish().uploads) == 1
    assert not planner.holds("r1", a.table) and planner.holds("r2", b.table)


def test_a_step_sends_a_bounded_share_of_new_tables_and_transitions(indexes):
    """64 warm requests at once sent every table and blob they needed in their first step
    (~600 MB on an H200, ~1.2 s before any first token): a step now sends at most
    `step_upload_bytes`; a table alone may exceed it, a blob goes in pieces, and each
    request is on the host path (its row with the step) until its own arrive."""
    a, b = indexes[0], indexes[2]
    words = a.table.rows.shape[1]
    # A third of a's table and blob: three steps to send them.
    budget = 4 * -(-(a.table.rows.nbytes // 4 + _blob_words(a)) // 3)
    planner = RowPlanner(words, table_slots=4096, max_rows=4, blob_words=10**8,
                         state_slots=4, step_upload_bytes=budget)
    pieces, steps = [], 0
    while True:
        steps += 1
        plan = planner.start()
        held = plan.device_state_row("r1", a, a.initial_state)
        if not held:
            plan.table_row(a.table, 0)  # the host path: a's row from its uploaded table
            plan.table_row(b.table, 1)  # b's table waits: the step has sent its share
        step = plan.finish()
        sent = (sum(r.nbytes for _, r in step.uploads)
                + sum(p.nbytes for _, p in step.blob_uploads))
        pieces += step.blob_uploads
        assert sent <= budget and len(step.uploads) == (steps == 1), steps
        assert step.direct.shape[0] == (not held)  # b's row: its table waits
        if held:
            break
        assert steps < 6
    assert steps == 3 and step.state_inits is not None  # the state once the blob is whole
    t = a.transitions
    whole = device_states.blob(t.offsets, t.tokens, t.targets,
                               planner._resident[a.table.serial][a.table.state_rows])
    base = pieces[0][0]
    assert [o for o, _ in pieces] == [base + sum(len(p) for _, p in pieces[:i])
                                      for i in range(len(pieces))]
    assert np.array_equal(np.concatenate([p for _, p in pieces]), whole)
    # A blob of more than BLOB_STEPS steps' share is never sent: it would hold back
    # every other index's that long; its requests stay on table rows.
    huge = RowPlanner(words, table_slots=4096, max_rows=4, blob_words=10**8, state_slots=4,
                      step_upload_bytes=4 * _blob_words(a) // (BLOB_STEPS + 1))
    for _ in range(BLOB_STEPS + 2):
        plan = huge.start()
        assert not plan.device_state_row("r1", a, a.initial_state)
        plan.table_row(a.table, 0)
        assert plan.finish().blob_uploads == []
    # A table larger than a step's share still goes, alone in its step.
    small = RowPlanner(words, table_slots=4096, max_rows=4, step_upload_bytes=1)
    plan = small.start()
    plan.table_row(a.table, 0)
    plan.table_row(b.table, 0)
    step = plan.finish()
    assert [len(r) for _, r in step.uploads] == [len(a.table.rows)]
    assert step.direct.shape[0] == 1
    # An evicted half-sent blob is forgotten, and sent whole when its index is back.
    planner = RowPlanner(words, table_slots=max(len(a.table.rows), len(b.table.rows)),
                         max_rows=4, blob_words=10**8, state_slots=4,
                         step_upload_bytes=budget)
    plan = planner.start()
    assert not plan.device_state_row("r1", a, a.initial_state)
    plan.finish()
    plan = planner.start()
    plan.table_row(b.table, 0)  # takes a's slots
    plan.finish()
    assert a.table.serial not in planner._unsent and a.table.serial not in planner._blobs


def test_a_request_is_not_on_the_device_until_the_host_is_in_step(indexes):
    a = indexes[1]
    planner = RowPlanner(a.table.rows.shape[1], table_slots=len(a.table.rows), max_rows=4,
                         blob_words=10**8, state_slots=4)
    plan = planner.start()
    assert not plan.device_state_row("r1", a, None)
    assert plan.finish().blob_uploads == [] and not planner.holds("r1", a.table)


def test_the_last_plans_device_states_are_those_moved_on_the_device(indexes):
    """What the scheduler asks of its whole batch each step, as one set operation:
    requests the last plan named by a device state the device still holds."""
    a = indexes[1]
    planner = RowPlanner(a.table.rows.shape[1], table_slots=len(a.table.rows), max_rows=4,
                         blob_words=10**8, state_slots=4)
    plan = planner.start()
    assert plan.device_state_row("r1", a, a.initial_state)
    assert plan.device_state_row("r2", a, a.initial_state)
    plan.table_row(a.table, 0)  # r3: on the host
    plan.finish()
    batch = {"r1": 1, "r2": 1, "r3": 1, "r4": 1}.keys()
    assert planner.moved_on_device(batch) == {"r1", "r2"}
    planner.release("r2")  # (ended, or preempted)
    assert planner.moved_on_device(batch) == {"r1"}
    plan = planner.start()
    plan.table_row(a.table, 0)  # a plan without r1 (it sat the step out)
    plan.finish()
    assert planner.moved_on_device(batch) == set() and planner.holds("r1", a.table)


# --- the scheduler: which steps sample without the host ---

def _grammar(backend, compiled: CompiledIndex) -> DotllmGrammar:
    return grammar_on_index(compiled, backend.vocabulary.eos_token_id, backend)


@pytest.fixture
def device_planner(backend):
    """The backend's planner, with device states on, for this test."""
    saved = backend._planner
    words = (backend.vocab_size + 31) // 32
    backend._planner = planner = RowPlanner(words, 4096, 8, blob_words=2**26,
                                            state_slots=32)
    yield planner
    backend._planner = saved


def _with_mixin(async_scheduling: bool, embedded_model, backend, monkeypatch):
    """vLLM's scheduler with the mixin, and the engine core's `row_plans` patch."""
    stock = StructuredOutputManager.grammar_bitmask
    monkeypatch.setattr(StructuredOutputManager, "grammar_bitmask",
                        row_plans._grammar_bitmask(stock))
    monkeypatch.setattr(StructuredOutputManager, "should_advance",
                        device_states_patch._should_advance(
                            StructuredOutputManager.should_advance))
    return _scheduler(async_scheduling, 200, embedded_model, backend,
                      mixins=(CompileOverlap, device_states_patch.DeviceStates))


@pytest.fixture
def async_scheduler(embedded_model, backend, device_planner, monkeypatch):
    scheduler = _with_mixin(True, embedded_model, backend, monkeypatch)
    assert isinstance(scheduler, AsyncScheduler)
    assert planner_of(scheduler.structured_output_manager) is device_planner
    return scheduler


def _request(request_id: str, grammar, max_tokens: int = 6, prompt: int = 20) -> Request:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(regex="x"))
    request = Request(request_id=request_id, prompt_token_ids=list(range(10, 10 + prompt)),
                      sampling_params=params, pooling_params=None,
                      block_hasher=get_request_block_hasher(BLOCK, HASH))
    request.structured_output_request.grammar = grammar
    return request


def _drive(scheduler, texts: dict[str, list[int]], grammars: dict,
           arrivals: dict[int, list[str]], steps: list[list[str]] | None = None,
           requests: dict[str, Request] | None = None, plans: list | None = None,
           prompts: dict[str, int] = {}) -> list[bool]:  # noqa: B006 (read only)
    """The engine core's loop with a batch queue of two: schedule, plan (unless the step
    is pending), then the previous step's output. `arrivals`: step -> the requests added
    before it; request r samples `texts[r]` (as many tokens as its max_tokens). Returns
    each step's pending flag; `steps`, if given, gets each step's requests, `requests`
    the requests made, `plans` each step's GrammarOutput; `prompts` sets prompt lengths
    (20 tokens otherwise). Without `steps` every row must be a device state's."""
    sampled = dict.fromkeys(texts, 0)
    pending, queue, step = [], [], 0
    while scheduler.has_requests() or queue or any(k >= step for k in arrivals):
        for request_id in arrivals.get(step, []):
            request = _request(request_id, grammars[request_id], len(texts[request_id]),
                               prompts.get(request_id, 20))
            if requests is not None:
                requests[request_id] = request
            scheduler.add_request(request)
        out = scheduler.schedule() if scheduler.has_requests() else None
        scheduled = out is not None and bool(out.num_scheduled_tokens)
        if scheduled:
            pending.append(out.pending_structured_output_tokens)
            if queue and out.pending_structured_output_tokens:  # deferred: accept first
                scheduler.update_from_output(*queue.pop(0))
            plan = scheduler.get_grammar_bitmask(out)
            if plans is not None:
                plans.append(plan)
            ids = list(out.num_scheduled_tokens)
            if steps is None:
                assert set(plan.grammar_bitmask.slots.tolist()) == {DEVICE_STATE}
            else:
                steps.append(ids)
            queue.append((out, _sampled(scheduler, ids, texts, sampled)))
        if len(queue) > 1 or (queue and not scheduled):
            scheduler.update_from_output(*queue.pop(0))
        step += 1
    return pending


def _sampled(scheduler, ids: list[str], texts: dict[str, list[int]],
             sampled: dict[str, int]) -> ModelRunnerOutput:
    """The step's output: each request past its prompt samples its text's next token
    (`sampled` counts them), none once its text is out or it ended since it was
    scheduled."""
    tokens = []
    for request_id in ids:
        if ((request := scheduler.requests.get(request_id)) is None
                or request.is_prefill_chunk or sampled[request_id] >= len(texts[request_id])):
            tokens.append([])
            continue
        tokens.append([texts[request_id][sampled[request_id]]])
        sampled[request_id] += 1
    return ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                             sampled_token_ids=tokens)


def _date_digits(tokenizer) -> list[int]:
    """Six tokens the date regex allows from its start: 7777-7."""
    digit = tokenizer.encode("7", add_special_tokens=False)[0]
    dash = tokenizer.encode("-", add_special_tokens=False)[0]
    return [digit] * 4 + [dash] + [digit] * 1


def test_steps_sample_without_the_host_once_every_request_is_on_the_device(
        async_scheduler, backend, indexes, tokenizer):
    date = indexes[3]
    before = backend.metrics.steps_not_deferred._value.get()
    pending = _drive(async_scheduler, {"d": _date_digits(tokenizer)},
                     {"d": _grammar(backend, date)}, {0: ["d"]})
    # The first sampling step has nothing in flight; every later one has a token in
    # flight, and the device holds the request's state.
    assert pending == [False] * 6
    assert backend.metrics.steps_not_deferred._value.get() - before == 5
    assert not device_planner_holds(async_scheduler, "d", date)


def test_a_request_joining_a_held_batch_keeps_its_steps_unpending(
        async_scheduler, backend, indexes, tokenizer):
    """Requests arriving while others run (a server's steady state): a newcomer has no
    token in flight at its first sampling step, so the device takes it from the index's
    initial state there, and no step waits for the host."""
    date = indexes[3]
    texts = dict.fromkeys("abc", _date_digits(tokenizer))
    pending = _drive(async_scheduler, texts,
                     {r: _grammar(backend, date) for r in texts}, {0: ["a"], 2: ["b"], 3: ["c"]})
    assert len(pending) >= 8 and not any(pending)
    assert not any(device_planner_holds(async_scheduler, r, date) for r in texts)


def test_a_few_requests_the_device_does_not_hold_sit_out_every_other_step(
        async_scheduler, backend, indexes, tokenizer):
    """One request on llguidance among six on the device: it samples every other step, in
    step with the host, and no step waits for the host; alone, its steps wait again."""
    date = indexes[3]
    held = "abcdef"
    texts = {r: _date_digits(tokenizer) for r in held}
    grammars = {r: _grammar(backend, date) for r in held}
    texts["z"] = _date_digits(tokenizer)
    grammars["z"] = z = grammar_on_llguidance(backend, REGEXES[3])
    accepts: list[bool] = []  # z's, each checked against its host-side llguidance state
    z.accept_tokens = lambda request_id, tokens, accept=z.accept_tokens: accepts.append(
        accept(request_id, tokens)) or accepts[-1]
    before = backend.metrics.steps_sat_out._value.get()
    steps: list[list[str]] = []
    pending = _drive(async_scheduler, texts, grammars, {0: [*held, "z"]}, steps)
    with_z = [i for i, ids in enumerate(steps) if "z" in ids]
    # Six steps for the six held requests, z in every other one of them, none pending...
    assert all(set(held) <= set(ids) for ids in steps[:6])
    assert with_z[:3] == [0, 2, 4] and not any(pending[:6])
    assert backend.metrics.steps_sat_out._value.get() - before == 3
    # ...then z alone, every step: those with its last token in flight wait for the host.
    assert with_z[3:] == [6, 7, 8] and pending[6:] == [False, True, True]
    assert accepts == [True] * 6
    assert not any(device_planner_holds(async_scheduler, r, date) for r in held)


def test_only_a_running_request_sits_out(async_scheduler, backend, indexes):
    """A preempted request goes back through the waiting queue, where a request given no
    tokens would stop the queue for the step: it never sits out."""
    scheduler = async_scheduler
    for request_id in "abcdef":
        scheduler.add_request(_request(request_id, _grammar(backend, indexes[3])))
    z = _request("z", grammar_on_llguidance(backend, REGEXES[3]))
    scheduler.add_request(z)
    scheduler.get_grammar_bitmask(scheduler.schedule())  # all in step: six held, z not
    assert planner_of(scheduler.structured_output_manager).need_host == {"z"}
    assert z.num_output_placeholders == 1  # its first token in flight
    assert "z" not in scheduler.schedule().num_scheduled_tokens  # it sits this one out
    scheduler.running.remove(z)
    scheduler._preempt_request(z, 0.0)
    assert "z" in scheduler.schedule().num_scheduled_tokens  # resumed from the queue


def device_planner_holds(scheduler, request_id, compiled) -> bool:
    return planner_of(scheduler.structured_output_manager).holds(request_id, compiled.table)


def test_a_request_the_device_does_not_hold_keeps_the_step_pending(
        async_scheduler, backend, indexes, tokenizer):
    scheduler = async_scheduler
    digit = tokenizer.encode("7", add_special_tokens=False)[0]
    scheduler.add_request(_request("a", _grammar(backend, indexes[3])))
    out = scheduler.schedule()
    scheduler.get_grammar_bitmask(out)  # "a" is in step: the device takes it
    planner_of(scheduler.structured_output_manager).release("a")  # (as if preempted)
    nxt = scheduler.schedule()
    assert nxt.pending_structured_output_tokens  # a token in flight, no device state
    scheduler.update_from_output(out, ModelRunnerOutput(
        req_ids=["a"], req_id_to_index={"a": 0}, sampled_token_ids=[[digit]]))
    plan = scheduler.get_grammar_bitmask(nxt).grammar_bitmask  # in step again: set anew
    assert plan.slots.tolist() == [DEVICE_STATE] and plan.state_inits is not None
    assert plan.state_inits[2].tolist() == [indexes[3].next_state(
        indexes[3].initial_state, digit)]


def _letters(tokenizer, text: str) -> list[int]:
    return [tokenizer.encode(c, add_special_tokens=False)[0] for c in text]


def test_a_repeated_plan_is_the_one_planned_anew(async_scheduler, backend, indexes,
                                                  tokenizer):
    """A step whose requests are those of the last, all on device states the device held,
    gets the last plan again without planning a request; planned anew, the plan would be
    the same. Requests arriving, ending (max_tokens) and refused (EOS) each stop it."""
    letters = indexes[0]
    eos = backend.vocabulary.eos_token_id
    texts = {"a": _letters(tokenizer, "abcdef ghijkl mnopqr stuvwx"),
             "b": _letters(tokenizer, "abc"),
             "c": _letters(tokenizer, "ab cd ef"),
             # ends its guide mid-batch (ignore_eos: the request goes on, unconstrained,
             # until the host refuses what follows)
             "d": _letters(tokenizer, "ab") + [eos] + _letters(tokenizer, "cd"),
             # a prompt of several steps' chunks, beside requests in decode
             "p": _letters(tokenizer, "abcdef ghijkl")}
    grammars = {r: _grammar(backend, letters) for r in texts}
    manager = async_scheduler.structured_output_manager
    requests: dict[str, Request] = {}
    plans: list = []
    repeated: list[bool] = []
    get = async_scheduler.get_grammar_bitmask

    def get_grammar_bitmask(out):
        before = backend.metrics.plans_repeated._value.get()
        output = get(out)
        repeated.append(backend.metrics.plans_repeated._value.get() > before)
        # The rows vLLM asks for: its constrained requests past their prompts (not one
        # that ended after it was scheduled: d, refused by the accept before this plan).
        assert output.structured_output_request_ids == [
            r for r in out.num_scheduled_tokens
            if (req := async_scheduler.requests.get(r)) and not req.is_prefill_chunk]
        if repeated[-1]:  # the same, planned anew (no device state set, none released)
            changes = device_planner_changes(async_scheduler)
            fresh = manager.grammar_bitmask(async_scheduler.requests,
                                            output.structured_output_request_ids, {})
            assert device_planner_changes(async_scheduler) == changes
            assert fresh.slots.tolist() == output.grammar_bitmask.slots.tolist()
            assert fresh.states.tolist() == output.grammar_bitmask.states.tolist()
            assert fresh.state_inits is None and not fresh.uploads
        return output

    async_scheduler.get_grammar_bitmask = get_grammar_bitmask
    steps: list[list[str]] = []
    _drive(async_scheduler, texts, grammars, {0: ["a", "b"], 3: ["c"], 4: ["d"], 10: ["p"]},
           steps, requests, plans, prompts={"p": 400})
    assert requests["p"].status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert sum(repeated) >= 4
    for i, ids in enumerate(steps):
        if i and ids != steps[i - 1]:  # a request came or went
            assert not repeated[i]
    # d's EOS released its device state: the next step waited for the host, whose guide
    # refused what followed the EOS before that step's plan (not repeated; d on its
    # device state in every plan until then).
    d_rows = [(i, plans[i].structured_output_request_ids.index("d")) for i in
              range(len(steps)) if "d" in plans[i].structured_output_request_ids]
    assert all(plans[i].grammar_bitmask.slots[row] == DEVICE_STATE for i, row in d_rows)
    gone = [i for i, ids in enumerate(steps)
            if "d" in ids and "d" not in plans[i].structured_output_request_ids]
    assert gone and not repeated[gone[0]]
    assert requests["d"].status == RequestStatus.FINISHED_ERROR  # what followed its EOS
    assert requests["a"].status == RequestStatus.FINISHED_LENGTH_CAPPED


def _walk_text(compiled: CompiledIndex, eos: int, rng: random.Random, limit: int
               ) -> list[int]:
    """A random text the index allows, ended by EOS where it may end (or cut at `limit`)."""
    state, text = compiled.initial_state, []
    while len(text) < limit:
        allowed = [t for t in compiled.transitions.tokens_from(state).tolist() if t != eos]
        if compiled.is_final(state) and (not allowed or rng.random() < 0.3):
            return [*text, eos]
        token = rng.choice(allowed)
        text.append(token)
        state = compiled.next_state(state, token)
    return text


@pytest.mark.parametrize("seed", range(12))
def test_a_mixed_batch_in_flight_ends_every_request_as_the_host_would(
        async_scheduler, backend, indexes, seed):
    """The engine core's loop with async scheduling (a batch queue of two) over requests
    arriving and ending at random: free ones beside constrained ones on several indexes,
    some ending with EOS, some cut by max_tokens, some with prompts of several chunks.
    Every plan has the rows vLLM asks for; every request ends as its text says (never
    refused by its guide), its guide at the end of its text."""
    rng = random.Random(seed)
    scheduler = async_scheduler
    eos = backend.vocabulary.eos_token_id
    texts, requests, grammars = {}, {}, {}
    arrivals: dict[int, list[str]] = {}
    for i in range(24):
        request_id = f"r{i}"
        arrivals.setdefault(rng.randrange(30), []).append(request_id)
        if i % 4 == 3:  # free
            texts[request_id] = [rng.randrange(100, 900) for _ in range(rng.randrange(1, 20))]
            continue
        compiled = indexes[i % 3 + 1]
        texts[request_id] = _walk_text(compiled, eos, rng, rng.randrange(3, 25))
        grammars[request_id] = _grammar(backend, compiled)
    prompts = {r: rng.choice([20, 20, 200]) for r in texts}
    metrics = backend.metrics
    before = metrics.plans_repeated._value.get(), metrics.steps_not_deferred._value.get()
    sampled = dict.fromkeys(texts, 0)
    queue, step = [], 0
    while scheduler.has_requests() or queue or any(k >= step for k in arrivals):
        for request_id in arrivals.get(step, []):
            text = texts[request_id]
            structured = (StructuredOutputsParams(regex="x") if request_id in grammars
                          else None)
            params = SamplingParams(max_tokens=len(text), structured_outputs=structured)
            params.update_from_generation_config({}, eos)  # as the engine sets it
            request = Request(request_id=request_id,
                              prompt_token_ids=list(range(10, 10 + prompts[request_id])),
                              sampling_params=params, pooling_params=None,
                              block_hasher=get_request_block_hasher(BLOCK, HASH))
            if structured is not None:
                request.structured_output_request.grammar = grammars[request_id]
            requests[request_id] = request
            scheduler.add_request(request)
        out = scheduler.schedule() if scheduler.has_requests() else None
        scheduled = out is not None and bool(out.num_scheduled_tokens)
        if scheduled:
            if queue and out.pending_structured_output_tokens:
                scheduler.update_from_output(*queue.pop(0))
            grammar_output = scheduler.get_grammar_bitmask(out)
            ids = list(out.num_scheduled_tokens)
            asked = [r for r in ids if (q := scheduler.requests.get(r)) is not None
                     and q.use_structured_output and not q.is_prefill_chunk]
            assert (grammar_output.structured_output_request_ids if grammar_output
                    else []) == asked
            queue.append((out, _sampled(scheduler, ids, texts, sampled)))
        if len(queue) > 1 or (queue and not scheduled):
            scheduler.update_from_output(*queue.pop(0))
        step += 1
        assert step < 2000
    for request_id, request in requests.items():
        ended_by_eos = texts[request_id][-1] == eos
        assert request.status == (RequestStatus.FINISHED_STOPPED if ended_by_eos
                                  else RequestStatus.FINISHED_LENGTH_CAPPED), request_id
        if request_id in grammars:
            guide = grammars[request_id].guide
            assert guide.is_terminated() == ended_by_eos
            assert guide._current.num_accepted == len(texts[request_id]), request_id
    assert not planner_of(scheduler.structured_output_manager).owners
    assert metrics.plans_repeated._value.get() > before[0]
    assert metrics.steps_not_deferred._value.get() > before[1]


def device_planner_changes(scheduler) -> int:
    return planner_of(scheduler.structured_output_manager).changes


def test_the_host_follows_the_device_in_walks(async_scheduler, backend, indexes,
                                               tokenizer):
    """A request the device moves is accepted by the host every few tokens in one walk,
    not a call a token; by its end every token was checked and counted."""
    letters = indexes[0]
    text = _letters(tokenizer, "abcdef ghijkl mnopqr stuvwx yzabc")
    grammar = _grammar(backend, letters)
    counted: list[int] = []
    grammar._count_tokens = lambda tier, n: counted.append(n)
    guide = grammar.guide
    calls: list[int] = []
    accept = guide.accept_tokens
    guide.accept_tokens = lambda tokens: calls.append(len(tokens)) or accept(tokens)
    requests: dict[str, Request] = {}
    pending = _drive(async_scheduler, {"a": text}, {"a": grammar}, {0: ["a"]},
                     requests=requests)
    assert not any(pending)
    assert sum(calls) == len(text) and len(calls) < len(text) / 4
    assert guide._current.state == letters.walk(letters.initial_state, text)[-1]
    # (reported 32 at a time, the rest when the grammar goes)
    assert sum(counted) + sum(grammar._uncounted.values()) == len(text)
    assert requests["a"].status == RequestStatus.FINISHED_LENGTH_CAPPED


def test_a_token_the_host_refuses_ends_the_request(async_scheduler, backend, indexes,
                                                    tokenizer):
    """The device moved a request by a token its guide does not allow (only where every
    logit was masked): the host, a few tokens behind, ends the request with an error."""
    letters = indexes[0]
    text = _letters(tokenizer, "abc") + _letters(tokenizer, "7") + _letters(
        tokenizer, "abcdef abcdef abcdef abcdef")
    requests: dict[str, Request] = {}
    _drive(async_scheduler, {"a": text}, {"a": _grammar(backend, letters)}, {0: ["a"]},
           requests=requests)
    request = requests["a"]
    assert request.status == RequestStatus.FINISHED_ERROR
    assert 4 <= request.num_output_tokens <= 4 + 16  # (DotllmGrammar's _FOLLOW_EVERY)


def test_a_state_set_anew_starts_where_the_host_caught_up(async_scheduler, backend,
                                                           indexes, tokenizer):
    """Released while the host follows (preempted), a request's device state is set
    again from its guide's state after every token the device had moved it by."""
    scheduler = async_scheduler
    date = indexes[3]
    digit = tokenizer.encode("7", add_special_tokens=False)[0]
    planner = planner_of(scheduler.structured_output_manager)
    scheduler.add_request(_request("a", _grammar(backend, date)))
    queue = []
    for _ in range(3):  # three tokens moved on the device, the host follows
        out = scheduler.schedule()
        scheduler.get_grammar_bitmask(out)
        queue.append((out, ModelRunnerOutput(
            req_ids=["a"], req_id_to_index={"a": 0}, sampled_token_ids=[[digit]])))
        if len(queue) > 1:
            scheduler.update_from_output(*queue.pop(0))
    scheduler.update_from_output(*queue.pop(0))
    grammar = scheduler.requests["a"].structured_output_request.grammar
    assert grammar._outputs is not None  # behind the device
    planner.release("a")  # (as if preempted)
    plan = scheduler.get_grammar_bitmask(scheduler.schedule()).grammar_bitmask
    assert plan.slots.tolist() == [DEVICE_STATE]
    assert plan.state_inits[2].tolist() == date.walk(date.initial_state, [digit] * 3)[-1:]


# --- end to end: `dotllm serve --dotllm-device-states-mib` ---

@pytest.fixture(scope="module")
def device_server(embedded_model, tmp_path_factory):
    server = start_dotllm(tmp_path_factory, extra_args=("--dotllm-device-states-mib", "64"))
    yield server
    stop_server(server)


def _constraints() -> list[dict]:
    schemas = [c.schema for c in load("Glaiveai2K", sample=4, seed=5)]
    schemas += [c.schema for c in load("Github_easy", sample=2, seed=5)]
    return [*({"json": s} for s in schemas),
            {"regex": r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9], ticket #[0-9]{4}"},
            {"choice": ["approved", "rejected", "needs more information"]}]


def _on_the_index(server, constraint: dict):
    """A greedy answer, checked; None if the request did not start on the index."""
    before = server.total("dotllm_constraint_tier_start_total", tier="index")
    choice = complete_constrained(server, constraint)
    check_answer(constraint, choice)
    on_index = server.total("dotllm_constraint_tier_start_total", tier="index") > before
    return choice if on_index else None


def _until_on_the_index(server, constraint: dict, tries: int = 4) -> None:
    """Requests until one starts on the index (a cold request's compile is cancelled if
    it ends first, queued behind slower ones)."""
    for _ in range(tries):
        if _on_the_index(server, constraint) is not None:
            return
        server.wait_for_compiles()
    raise AssertionError(f"never on the index: {constraint}")


@pytest.mark.server
def test_the_workers_warm_their_mask_kernels_up_before_serving(device_server):
    """vLLM's warm-up at start (`_dummy_sampler_run`) makes each worker's arena and runs
    its ops once: on a GPU compiling the states' Triton ops took ~1 s of the first
    constrained request's step."""
    log = device_server.log.read_text(errors="replace")
    warmed = log.find("DotLLM applies grammar bitmasks")
    assert 0 <= warmed < log.find("Application startup complete")


@pytest.mark.parametrize("device", _devices())
def test_a_warmed_up_arena_masks_as_a_fresh_one(device, indexes):
    """What the warm-up wrote (slot 0, blob offset 0, state slot 0) never shows: every
    plan writes what it reads."""
    a = indexes[3]
    words = a.table.rows.shape[1]
    warmed, fresh = MaskArena(torch.device(device), words), MaskArena(torch.device(device), words)
    warmed.warm_up()
    planner = RowPlanner(words, table_slots=256, max_rows=4, blob_words=10**7, state_slots=4)
    state = a.initial_state
    for step in range(3):
        plan = planner.start()
        assert plan.device_state_row("r1", a, state if step == 0 else None)
        plan.table_row(a.table, 1)
        step_plan = plan.finish()
        token = int(a.transitions.tokens_from(state)[0])
        results = []
        for arena in (warmed, fresh):
            logits = random_logits(3, words * 32, torch.float32, device,
                                   torch.Generator().manual_seed(step))
            arena.apply(logits, step_plan, np.array([2, 0], dtype=np.int32))
            arena.advance(torch.tensor([[0], [0], [token]], dtype=torch.int64, device=device))
            results.append(logits.cpu())
        assert torch.equal(results[0], results[1]), step
        assert torch.isinf(results[0][2]).sum() > 0  # masked by the state's row
        state = a.transitions.next_state(state, token)


@pytest.mark.server
def test_served_answers_are_those_of_the_host_path(dotllm_server, device_server):
    """Greedy, one request at a time. Cold (llguidance first, then the hand-over, at a
    moment that depends on the compile): valid. On the index from the first token: token
    for token the answers of a server without device states. (vLLM's CPU platform turns
    async scheduling off: here device states serve every step's masks, and the
    scheduler's part is tested in process above.)"""
    constraints = _constraints()
    for constraint in constraints:
        for server in (dotllm_server, device_server):
            _until_on_the_index(server, constraint)
    for constraint in constraints:
        answers = [_on_the_index(server, constraint) for server in (dotllm_server, device_server)]
        assert answers[1] is not None and answers[0] is not None, constraint
        plain, ours = answers
        assert (ours.text, ours.finish_reason) == (plain.text, plain.finish_reason), constraint
    assert device_server.total("dotllm_mask_rows_total", source="state") > 0


@pytest.mark.server
def test_a_concurrent_sampled_batch_is_valid(device_server):
    """Requests joining and leaving a running batch (device states set, released and
    handed out again), sampled: every complete answer satisfies its constraint."""
    constraints = _constraints()
    jobs = [(c, 100 + i, f"Reply {i}:") for i, c in enumerate(constraints * 3)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(
            lambda job: complete_constrained(device_server, job[0], 1.0, job[1], job[2]), jobs))
    for (constraint, _, _), choice in zip(jobs, answers, strict=True):
        check_answer(constraint, choice)
    assert sum(c.finish_reason == "stop" for c in answers) > len(answers) // 2


def test_the_synchronous_scheduler_releases_a_finished_requests_state(
        embedded_model, backend, device_planner, monkeypatch, indexes, tokenizer):
    scheduler = _with_mixin(False, embedded_model, backend, monkeypatch)
    digit = tokenizer.encode("7", add_special_tokens=False)[0]
    dash = tokenizer.encode("-", add_special_tokens=False)[0]
    text = [digit] * 4 + [dash, digit]
    scheduler.add_request(_request("s", _grammar(backend, indexes[3])))
    for step, token in enumerate(text):  # max_tokens: 6
        out = scheduler.schedule()
        assert not out.pending_structured_output_tokens
        plan = scheduler.get_grammar_bitmask(out).grammar_bitmask
        assert plan.slots.tolist() == [DEVICE_STATE]
        assert (plan.state_inits is not None) == (step == 0)  # set once, then the device's
        assert device_planner.holds("s", indexes[3].table)
        scheduler.update_from_output(out, ModelRunnerOutput(
            req_ids=["s"], req_id_to_index={"s": 0}, sampled_token_ids=[[token]]))
    assert scheduler.get_num_unfinished_requests() == 0
    assert not device_planner.holds("s", indexes[3].table) and not device_planner.owners


def test_without_dotllms_backend_the_scheduler_is_vllms(embedded_model):
    """No DotLLM backend (a server without a tokenizer has none): nothing to release."""
    scheduler = _scheduler(True, 200, embedded_model, None,
                           mixins=(device_states_patch.DeviceStates,))
    params = SamplingParams(max_tokens=1)
    scheduler.add_request(Request(request_id="f", prompt_token_ids=[5, 6, 7],
                                  sampling_params=params, pooling_params=None,
                                  block_hasher=get_request_block_hasher(BLOCK, HASH)))
    out = scheduler.schedule()
    scheduler.update_from_output(out, ModelRunnerOutput(
        req_ids=["f"], req_id_to_index={"f": 0}, sampled_token_ids=[[9]]))
    assert scheduler.get_num_unfinished_requests() == 0
