"""The engine core's part of a step for 256 requests on an index: the row plan (issue 12's
"host work per step for 256 index-tier rows at most 100 us; at most 16 bytes a row").

    pytest bench/test_step_plan.py --benchmark-enable --benchmark-only \
        --benchmark-columns=mean,median,ops

Table rows (a slot per row, the host's state read each step) against device states (a
state slot per row, set once; the step also needs no accept of the last step's tokens
before it, which this does not time: that is the `device_states` patch's gain).
"""

from __future__ import annotations

import pytest

from dotllm.compiler.compiled import CompiledIndex
from dotllm.compiler.spec import ConstraintSpec
from dotllm.mask_plan import RowPlanner
from dotllm.vllm_ext.backend import DotllmGrammar
from tests.conftest import grammar_on_index

ROWS = 256
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string"}, "tags": {
              "type": "array", "items": {"enum": ["red", "green", "blue", "cyan"]}}},
          "required": ["name", "tags"]}


@pytest.fixture(scope="module")
def grammars(vocabulary, tokenizer) -> list[DotllmGrammar]:
    compiled = CompiledIndex.for_spec(ConstraintSpec.json_schema(SCHEMA), vocabulary)
    eos = vocabulary.eos_token_id
    out = []
    for i in range(ROWS):
        grammar = grammar_on_index(compiled, eos)
        text = '{"name": "Ada", "tags": ["red", "blue"' if i % 2 else '{"name": "Lo'
        assert grammar.accept_tokens(f"r{i}", tokenizer.encode(text, add_special_tokens=False))
        out.append(grammar)
    return out


def row_planner(vocabulary, device_states: bool) -> RowPlanner:
    words = (vocabulary.size + 31) // 32
    return RowPlanner(words, 4096, ROWS, blob_words=2**26 if device_states else 0,
                      state_slots=4 * ROWS)


def test_plan_of_table_rows(benchmark, grammars, vocabulary):
    planner = row_planner(vocabulary, False)

    def step():
        plan = planner.start()
        for grammar in grammars:
            grammar.add_row(plan)
        return plan.finish()

    step()  # the table's upload, once
    benchmark.group = f"engine-core plan, {ROWS} index rows"
    plan = benchmark(step)
    assert plan.nbytes == 4 * ROWS


def test_plan_of_device_state_rows(benchmark, grammars, vocabulary):
    planner = row_planner(vocabulary, True)
    ids = [f"r{i}" for i in range(ROWS)]
    first = planner.start()
    for request_id, grammar in zip(ids, grammars, strict=True):
        assert grammar.add_state_row(first, request_id, True)
    first.finish()

    def step():
        plan = planner.start()
        for request_id, grammar in zip(ids, grammars, strict=True):
            grammar.add_state_row(plan, request_id, False)
        return plan.finish()

    benchmark.group = f"engine-core plan, {ROWS} index rows"
    plan = benchmark(step)
    assert plan.nbytes == 8 * ROWS  # a slot and a state slot a row; nothing else
