"""The engine core's whole part of a decode step for 256 requests, as it runs with async
scheduling: `schedule()`, the row plan, and the previous step's `update_from_output` (the
grammars' accept), with the patches a server has there, for free requests, requests on
an index with table rows, and with device states; and free requests on stock vLLM's
scheduler, none of DotLLM's mixins or patches there (what DotLLM costs a batch without
constraints). With the model's worker in a process of its own (DotLLM's default on one
GPU) this is what must fit in a forward pass.

    pytest bench/test_engine_step.py --benchmark-enable --benchmark-only \
        --benchmark-columns=mean,median,ops
"""

from __future__ import annotations

import collections
import itertools

import pytest
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import RequestStatus
from vllm.v1.structured_output import StructuredOutputManager
from vllm.v1.structured_output.request import StructuredOutputRequest

from dotllm.compiler.compiled import CompiledIndex
from dotllm.mask_plan import RowPlanner
from dotllm.vllm_ext import device_states, ready_grammar, row_plans
from dotllm.vllm_ext.compile_overlap import CompileOverlap
from dotllm.vllm_ext.device_states import DeviceStates
from tests.conftest import grammar_on_index, grammar_on_llguidance
from tests.test_compile_overlap import _scheduler, make_request

ROWS = 256
BLOCKS = 12000
CHURN = ", a request replaced each step"
STOCK = "free, stock vLLM"  # no DotLLM mixin or patch: what DotLLM costs a free step
MODES = (STOCK, "free", "table rows", "device states", "device states, 4 on llguidance",
         "free" + CHURN, "device states" + CHURN)
ON_LLGUIDANCE = 4


def _patch_as_a_server(monkeypatch) -> None:
    """The engine core's patches a `dotllm serve` has."""
    monkeypatch.setattr(StructuredOutputManager, "grammar_bitmask",
                        row_plans._grammar_bitmask(StructuredOutputManager.grammar_bitmask))
    monkeypatch.setattr(StructuredOutputManager, "should_advance",
                        device_states._should_advance(StructuredOutputManager.should_advance))
    check = StructuredOutputRequest._check_grammar_completion  # as a server patches it
    monkeypatch.setattr(StructuredOutputRequest, "_check_grammar_completion",
                        ready_grammar._ready_first(check))


@pytest.mark.parametrize("mode", MODES)
def test_engine_core_step_256_decodes(benchmark, mode, embedded_model, backend, vocabulary,
                                      tokenizer, monkeypatch):
    if mode != STOCK:
        _patch_as_a_server(monkeypatch)
    words = (backend.vocab_size + 31) // 32
    monkeypatch.setattr(backend, "_planner", RowPlanner(
        words, 4096, ROWS, blob_words=2**26 if mode.startswith("device states") else 0,
        state_slots=4 * ROWS))
    scheduler = _scheduler(True, BLOCKS, embedded_model, backend,
                           mixins=() if mode == STOCK else (CompileOverlap, DeviceStates),
                           max_num_seqs=ROWS, budget=8192)
    digit = tokenizer.encode("7", add_special_tokens=False)[0]
    compiled = CompiledIndex.build("[0-9]+", vocabulary)
    eos = vocabulary.eos_token_id

    def add(i: int) -> None:
        request, grammar = make_request(f"r{i}", 20, constrained=not mode.startswith("free"),
                                        max_tokens=100_000, compiling=False)
        if grammar is not None:
            grammar.set_result(grammar_on_llguidance(backend, "[0-9]+")
                               if mode.endswith("llguidance") and i < ON_LLGUIDANCE
                               else grammar_on_index(compiled, eos, backend))
        scheduler.add_request(request)

    for i in range(ROWS):
        add(i)
    queue, pending, sizes = [], [], []
    # Requests that end at different lengths (a schema mix): one ends and one arrives
    # each step, so the batch is never the last one's.
    running, arrivals = collections.deque(range(ROWS)), itertools.count(ROWS)

    def step():
        """The engine core's loop with a batch queue of two (vLLM's step_with_batch_queue):
        a step marked pending accepts the previous step's tokens before its plan."""
        if mode.endswith(CHURN):
            scheduler.finish_requests(f"r{running.popleft()}", RequestStatus.FINISHED_ABORTED)
            running.append(i := next(arrivals))
            add(i)
        out = scheduler.schedule()
        pending.append(out.pending_structured_output_tokens)
        sizes.append(len(out.num_scheduled_tokens))
        if queue and out.pending_structured_output_tokens:
            scheduler.update_from_output(*queue.pop(0))
        scheduler.get_grammar_bitmask(out)
        ids = list(out.num_scheduled_tokens)
        queue.append((out, ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
            sampled_token_ids=[[] if scheduler.requests[r].is_prefill_chunk else [digit]
                               for r in ids])))
        if len(queue) > 1:
            scheduler.update_from_output(*queue.pop(0))

    for _ in range(4):  # every request past its prompt, its device state set
        step()
    benchmark.group = f"engine-core step, {ROWS} requests in decode"
    benchmark.pedantic(step, rounds=200, warmup_rounds=5)
    for _ in range(4):  # (one round only where benchmarks are disabled, as in CI)
        step()
    # Only table rows wait for the host: the step that samples needs the last accept (the
    # requests on llguidance sit every other step out instead).
    assert set(pending[4:]) == {mode == "table rows"}
    assert set(sizes[4:]) == ({ROWS, ROWS - ON_LLGUIDANCE} if mode.endswith("llguidance")
                              else {ROWS})
