"""vLLM's `schedule()` for 256 constrained requests in decode: stock `AsyncScheduler` and
with DotLLM's compile-overlap mixin, whose cap every request passes through.

    pytest bench/test_schedule_step.py --benchmark-enable --benchmark-only \
        --benchmark-columns=mean,median,ops

Each timed call is one `schedule()`; the previous step's tokens are accepted between
calls, untimed, as the engine core does with async scheduling.
"""

from __future__ import annotations

import pytest
from vllm.v1.outputs import ModelRunnerOutput

from dotllm.compiler.compiled import CompiledIndex
from dotllm.vllm_ext.compile_overlap import CompileOverlap
from tests.conftest import grammar_on_index
from tests.test_compile_overlap import _scheduler, make_request

ROWS = 256
BLOCKS = 8000
MIXINS = {"stock": (), "overlap": (CompileOverlap,)}


@pytest.mark.parametrize("mixins", list(MIXINS))
def test_schedule_256_constrained_decodes(benchmark, mixins, embedded_model, vocabulary,
                                          tokenizer):
    # No DotLLM backend (its metrics are the tests' own): grammars on a ready index.
    scheduler = _scheduler(True, BLOCKS, embedded_model, None, mixins=MIXINS[mixins],
                           max_num_seqs=ROWS, budget=8192)
    digit = tokenizer.encode("7", add_special_tokens=False)[0]
    compiled = CompiledIndex.build("[0-9]+", vocabulary)
    eos = vocabulary.eos_token_id
    for i in range(ROWS):
        request, grammar = make_request(f"r{i}", 20, max_tokens=100_000, compiling=False)
        grammar.set_result(grammar_on_index(compiled, eos))
        scheduler.add_request(request)
    in_flight = []

    def accept_previous():
        if in_flight:
            out = in_flight.pop()
            ids = list(out.num_scheduled_tokens)
            scheduler.update_from_output(out, ModelRunnerOutput(
                req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                sampled_token_ids=[[digit]] * len(ids)))
        return (), {}

    def schedule():
        in_flight.append(scheduler.schedule())

    for _ in range(3):  # every request past its prompt
        accept_previous()
        schedule()
    benchmark.group = f"schedule(), {ROWS} constrained requests in decode"
    benchmark.pedantic(schedule, setup=accept_previous, rounds=50)
    assert len(in_flight[-1].num_scheduled_tokens) == ROWS
