"""The model worker's part of a constrained step for 256 requests on an index: what
`sample_tokens` pays for DotLLM's mask (issue 12; 0.40 ms a step with table rows, 0.54 ms
with device states, on an H100 host in a served step, bench/RESULTS.md).

    pytest bench/test_worker_mask.py --benchmark-enable --benchmark-only \
        --benchmark-columns=median,ops [--benchmark-cprofile=tottime]
    # on the GPU machine after `source bench/gpu_setup.sh` (the CUDA kernel built)

Device states run with each implementation of their ops the device has (on CUDA the
extension's, csrc/states.cu, and Triton's). The plans are the engine core's
(bench/test_step_plan.py's grammars); each round is one step's `mask_kernels` call as
vLLM's V2 runner makes it (the logits rows found, the rows masked, the device states
moved by the tokens sampled). On CUDA the GPU is synchronized
before each round, not in it, so a round's time is the host's: launches return at once;
"GPU busy" rounds start with the GPU at other work, as in a served step.
On the CPU (CI, benchmarks disabled) it checks that the masked logits are the plans'.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench.test_step_plan import ROWS, grammars, row_planner  # noqa: F401 (a fixture)
from dotllm.kernels import states
from dotllm.kernels.arena import RowPlan
from dotllm.vllm_ext import mask_kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _plans(on_index, vocabulary, device_states: bool):
    """The first step's plan (uploads, state inits) and a steady step's."""
    planner = row_planner(vocabulary, device_states)
    ids = [f"r{i}" for i in range(ROWS)]
    plans = []
    for first in (True, False):
        plan = planner.start()
        for request_id, grammar in zip(ids, on_index, strict=True):
            if device_states:
                assert grammar.add_state_row(plan, request_id, first)
            else:
                grammar.add_row(plan)
        plans.append(plan.finish())
    return plans, ids


def _variants():
    """Table rows, and device states by each implementation of their ops here."""
    return [pytest.param(None, id="table rows"),
            *(pytest.param(name, id=f"device states, {name}")
              for name in states.implementations(DEVICE))]


def _rolled(plan: RowPlan) -> RowPlan:
    """The same rows in another order: a step the arena cannot launch again as it is."""
    return dataclasses.replace(plan, slots=np.roll(plan.slots, 1), states=(
        None if plan.states is None else np.roll(plan.states, 1)))


@pytest.mark.parametrize("steps", ["the same step again", "steps alternating",
                                   "steps alternating, GPU busy"])
@pytest.mark.parametrize("states_ops", _variants())
def test_worker_mask_step(benchmark, grammars, vocabulary, states_ops, steps,  # noqa: F811
                          monkeypatch):
    if states_ops is not None:
        ops = states.named(states_ops)
        monkeypatch.setattr(states, "implementation", lambda _: ops)
    mask_kernels._arena.cache_clear()  # a new arena, with these ops
    device_states = states_ops is not None
    (first, steady), ids = _plans(grammars, vocabulary, device_states)
    vocab = vocabulary.size
    batch = SimpleNamespace(req_ids=ids, cu_num_logits_np=np.arange(ROWS + 1, dtype=np.int32))
    logits = torch.randn(ROWS, vocab, device=DEVICE, dtype=torch.float32)
    sampled = torch.zeros((ROWS, 1), dtype=torch.int64, device=DEVICE)

    def step(plan):
        targets = mask_kernels.v2_rows(batch, ids)
        mask_kernels.apply_rows(logits, plan, None, targets, "V2")
        mask_kernels.advance_states(sampled)  # no move: token 0 is not allowed here

    step(first)
    rows = np.zeros((ROWS, first.words), dtype=np.int32)
    for grammar, row in zip(grammars, rows, strict=True):
        grammar.fill_row(row)
    bits = (torch.from_numpy(rows).unsqueeze(-1) >> torch.arange(32)) & 1
    assert torch.equal(logits.isneginf().cpu(), bits.flatten(1)[:, :vocab] == 0)

    # Each round gets a plan of its own, as the worker does (unpickled from the engine
    # core's): equal to the last round's (the engine core repeated its plan: the arena
    # launches again, kernels.arena._LastStep) or not (the whole path).
    # "GPU busy": each round starts while the GPU runs 1-2 ms of other work (8 bf16
    # matmuls of 4096), as a served step's mask is applied while the forward pass runs:
    # what waits on the GPU, in a copy or an event, is then host time too.
    others = (steady, _rolled(steady)) if steps.startswith("steps alternating") else (steady,)
    rounds = itertools.cycle(others)
    busy = (torch.randn(4096, 4096, device=DEVICE, dtype=torch.bfloat16)
            if DEVICE.type == "cuda" and steps.endswith("GPU busy") else None)

    def synchronized():
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        for _ in range(8 if busy is not None else 0):
            busy @ busy  # noqa: B018 (work for the GPU, not a value)
        return (copy.deepcopy(next(rounds)),), {}

    benchmark.group = f"worker mask step, {ROWS} index rows, V={vocab}, {DEVICE.type}, {steps}"
    benchmark.pedantic(step, setup=synchronized, rounds=200, warmup_rounds=5)
