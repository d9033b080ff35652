"""Row plans: which rows a step sends and how (RowPlanner, engine core), how a worker
applies them (MaskArena), and the `row_plans` patch against vLLM's own bitmask loop."""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm.v1.structured_output import StructuredOutputManager
from vllm.v1.structured_output.backend_types import StructuredOutputOptions

from dotllm.compiler.mask_table import MaskTable
from dotllm.kernels.arena import UNCONSTRAINED, MaskArena, RowPlan, direct_slot
from dotllm.mask_plan import RowPlanner
from dotllm.vllm_ext import row_plans
from tests.test_kernels import random_logits, random_masks, reference

WORDS = 8


@pytest.fixture
def generator():
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh data each run
    return g


def table(rows: int, generator=None) -> MaskTable:
    masks = random_masks(rows, WORDS, generator) if generator is not None else torch.zeros(
        (rows, WORDS), dtype=torch.int32)
    return MaskTable(masks.numpy(), np.arange(rows, dtype=np.int32))


def expand(plan: RowPlan, arena: dict[int, np.ndarray]) -> list[np.ndarray | None]:
    """The rows a plan means (None: unconstrained), with `arena` the slots' rows so far."""
    for slots, rows in plan.uploads:
        arena.update(zip(slots.tolist(), rows, strict=True))
    out = []
    for slot in plan.slots.tolist():
        out.append(None if slot == UNCONSTRAINED else arena[slot] if slot >= 0
                   else plan.direct[-2 - slot])
    return out


# --- the planner ---

def test_a_table_is_uploaded_once_into_the_lowest_free_slots():
    planner, a = RowPlanner(WORDS, table_slots=8, max_rows=16), table(3)
    plan = planner.start()
    plan.table_row(a, 2)
    plan.table_row(a, 0)
    first = plan.finish()
    assert first.slots.tolist() == [2, 0] and len(first.uploads) == 1
    assert first.uploads[0][0].tolist() == [0, 1, 2] and first.uploads[0][1] is a.rows
    plan = planner.start()
    plan.table_row(a, 1)
    second = plan.finish()
    assert second.slots.tolist() == [1] and second.uploads == []
    assert second.nbytes == 4  # one int32 for a row of a table the workers hold


def test_the_least_recently_used_table_makes_room_never_one_in_use():
    planner = RowPlanner(WORDS, table_slots=8, max_rows=16)
    a, b, c = table(4), table(4), table(4)
    for t in (a, b):
        plan = planner.start()
        plan.table_row(t, 0)
        plan.finish()
    plan = planner.start()
    plan.table_row(b, 1)  # b is now the most recent, and in use this step
    plan.table_row(c, 3)  # evicts a, not b
    step = plan.finish()
    assert [s.tolist() for s, _ in step.uploads] == [[0, 1, 2, 3]]
    assert step.slots.tolist() == [5, 3]
    plan = planner.start()
    plan.table_row(c, 0)
    plan.table_row(b, 0)
    plan.table_row(a, 0)  # no room left that this step does not use: sent as a row
    step = plan.finish()
    assert step.slots.tolist() == [0, 4, direct_slot(0)] and step.uploads == []
    assert np.array_equal(step.direct[0], a.rows[0])


def test_a_table_larger_than_the_arena_and_other_rows_travel_with_the_step():
    planner = RowPlanner(WORDS, table_slots=2, max_rows=8)
    big = table(3)
    plan = planner.start()
    plan.table_row(big, 1)
    plan.unconstrained()
    plan.direct_row()[:] = 7
    step = plan.finish()
    assert step.slots.tolist() == [direct_slot(0), UNCONSTRAINED, direct_slot(1)]
    assert (step.direct[1] == 7).all() and step.uploads == []


# --- the arena, against the reference ---

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_plans_step_after_step_with_evictions(device, generator):
    """Mixed steps (table rows, the step's own rows, unconstrained rows, bitmask rows
    some logits lack) through a planner too small for every table, steps queued back to
    back: each masks what its rows say."""
    vocab, batch = WORDS * 32 - 5, 24
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=generator)))
    tables = [table(n, generator) for n in (3, 5, 2, 6)]
    planner = RowPlanner(WORDS, table_slots=9, max_rows=32)
    arena = MaskArena(torch.device(device), WORDS)
    uploads, slots_seen, steps = Counter(), {}, []
    for _ in range(40):
        plan = planner.start()
        rows, kinds = [], []
        for _ in range(rng.randint(1, batch)):
            kind = rng.random()
            if kind < 0.6:
                t = rng.choice(tables)
                r = rng.randrange(len(t.rows))
                plan.table_row(t, r)
                rows.append(t.rows[r])
                kinds.append("table")
            elif kind < 0.85:
                row = random_masks(1, WORDS, generator).numpy()[0]
                plan.direct_row()[:] = row
                rows.append(row)
                kinds.append("step")
            else:
                plan.unconstrained()
                rows.append(None)
                kinds.append(None)
        step = plan.finish()
        assert [r is None or np.array_equal(r, e) for r, e in
                zip(expand(step, slots_seen), rows, strict=True)] == [True] * len(rows)
        for _, table_rows in step.uploads:
            uploads[id(table_rows)] += 1
        sources = sorted(rng.sample(range(len(rows)), rng.randint(1, len(rows))))
        targets = np.array(rng.sample(range(batch), len(sources)), dtype=np.int32)
        masks = torch.from_numpy(np.stack([rows[s] if rows[s] is not None else
                                           np.zeros(WORDS, np.int32) for s in sources]))
        mask_rows = torch.tensor([i if rows[s] is not None else -1
                                  for i, s in enumerate(sources)], dtype=torch.int32)
        logits = random_logits(batch, vocab, torch.bfloat16, device, generator)
        expected = reference(logits, masks, torch.from_numpy(targets), mask_rows)
        masked = arena.apply(logits, step, targets, np.array(sources))
        # A table row the planner could not place travels with the step.
        on_table = [step.slots[s] >= 0 for s in sources]
        assert masked.table == sum(on_table) and masked.state == 0
        assert masked.step == sum(kinds[s] is not None for s in sources) - masked.table
        steps.append((logits, expected))
    for logits, expected in steps:  # checked once all were queued
        assert torch.equal(logits.double().cpu(), expected)
    assert max(uploads.values()) > 1, "no table was evicted and uploaded again"


def test_a_bitmask_from_vllms_loop_is_applied_as_it_is(generator):
    masks = random_masks(5, WORDS, generator)
    logits = random_logits(5, WORDS * 32, torch.float32, "cpu", generator)
    expected = reference(logits, masks, None, None)
    MaskArena(torch.device("cpu"), WORDS).apply(logits, RowPlan.of_rows(masks.numpy()),
                                                np.arange(5, dtype=np.int32))
    assert torch.equal(logits.double(), expected)


# --- the patch, against vLLM's loop ---

@pytest.fixture
def manager(backend):
    """vLLM's manager around DotLLM's backend, with what its bitmask loop reads."""
    m = object.__new__(StructuredOutputManager)
    m.backend, m.reasoner_cls, m.enable_in_reasoning = backend, None, False
    m.vllm_config = SimpleNamespace(
        num_speculative_tokens=3, model_config=SimpleNamespace(is_diffusion=False),
        scheduler_config=SimpleNamespace(max_num_seqs=8))
    m._grammar_bitmask, m._full_mask = None, torch.tensor(-1, dtype=torch.int32)
    m.fill_bitmask_parallel_threshold, m.executor_for_fillmask = 128, None
    return m


def _on_the_index(backend, kind, text):
    deadline = time.monotonic() + 120
    while True:
        grammar = backend.compile_grammar(kind, text)
        if grammar.guide.table_row() is not None or time.monotonic() > deadline:
            return grammar
        time.sleep(0.2)


def test_the_plan_means_what_vllms_bitmask_says(manager, backend, tokenizer):
    """Both tiers (two llguidance rows filled in one call), drafts (one -1), a finished
    grammar: row for row the same masks."""
    choice = '["alpha", "beta", "gamma"]'
    indexed = _on_the_index(backend, StructuredOutputOptions.CHOICE, choice)
    assert indexed.guide.table_row() is not None
    lark = backend.compile_grammar(StructuredOutputOptions.GRAMMAR, 'start: "x" ("y" | "z")+')
    assert lark.guide.table_row() is None  # llguidance
    done = backend.compile_grammar(StructuredOutputOptions.CHOICE, choice)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    assert done.accept_tokens("d", encode("beta") + [tokenizer.eos_token_id])
    lark_on = backend.compile_grammar(StructuredOutputOptions.GRAMMAR, 'start: "x" ("y" | "z")+')
    assert lark_on.accept_tokens("m", encode("x"))  # two llguidance rows: one parallel fill
    grammars = {"i": indexed, "l": lark, "d": done, "m": lark_on,
                "j": backend.compile_grammar(StructuredOutputOptions.CHOICE, choice)}
    requests = {k: SimpleNamespace(structured_output_request=SimpleNamespace(grammar=g))
                for k, g in grammars.items()}
    drafts = {"i": encode("gam")[:1] + [-1, 5], "l": encode("xy"), "j": encode("al")}
    ids = ["l", "i", "m", "d", "j"]
    stock = StructuredOutputManager.grammar_bitmask
    while getattr(stock, "dotllm_wraps", None) is not None:  # vLLM's own loop
        stock = stock.dotllm_wraps
    ours, slots = row_plans._grammar_bitmask(stock), {}
    for spec in (drafts, {}):
        expected = stock(manager, requests, ids, spec).copy()
        plan = ours(manager, requests, ids, spec)
        assert isinstance(plan, RowPlan) and len(plan) == len(expected)
        for got, want in zip(expand(plan, slots), expected, strict=True):
            assert np.array_equal(got if got is not None else np.full_like(want, -1), want)
        assert (plan.slots >= 0).any() and (plan.slots <= -2).any()
