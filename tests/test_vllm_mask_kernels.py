"""The `mask_kernels` patch: vLLM's row mapping kept, DotLLM's kernel applied.

Compared with stock vLLM 0.26's V1 `apply_grammar_bitmask` (xgrammar's CPU kernel) on
the same random batch, with speculative tokens and a constrained request missing from
the batch; the V2 mapping is checked against its definition.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import torch
from vllm.v1.structured_output.utils import apply_grammar_bitmask as stock_apply

from dotllm.vllm_ext import mask_kernels


def _random_step(rng: np.random.Generator):
    vocab, words = 1000, 32
    req_ids = [f"r{i}" for i in range(8)]
    spec = {"r1": [5, 6], "r4": [7], "r6": [1, 2, 3]}
    constrained = ["r6", "r1", "gone", "r3", "r4"]  # "gone" is not in this batch
    rows = sum(1 + len(spec.get(r, ())) for r in constrained)
    bitmask = rng.integers(-2**31, 2**31, size=(rows, words), dtype=np.int64).astype(np.int32)
    num_logits = len(req_ids) + sum(len(v) for v in spec.values())
    logits = torch.from_numpy(rng.standard_normal((num_logits, vocab)).astype(np.float32) + 3)
    scheduler_output = SimpleNamespace(scheduled_spec_decode_tokens=spec)
    grammar_output = SimpleNamespace(grammar_bitmask=bitmask,
                                     structured_output_request_ids=constrained)
    return scheduler_output, grammar_output, SimpleNamespace(req_ids=req_ids), logits


def test_v1_matches_stock_vllm_on_a_batch_with_speculative_rows():
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    scheduler_output, grammar_output, input_batch, logits = _random_step(rng)
    expected = logits.clone()
    stock_apply(scheduler_output, grammar_output, input_batch, expected)
    assert (expected == float("-inf")).any()
    mask_kernels._v1_apply(None)(scheduler_output, grammar_output, input_batch, logits)
    assert torch.equal(logits, expected)


def test_v1_rows_follow_batch_order_and_speculative_offsets():
    scheduler_output, grammar_output, input_batch, _ = _random_step(np.random.default_rng(0))
    sources, targets = mask_kernels.v1_rows(scheduler_output, grammar_output, input_batch)
    # r6: logits 9..12 (after r1's and r4's drafts), r1: 1..3, r3: 5, r4: 6..7.
    assert targets == [9, 10, 11, 12, 1, 2, 3, 5, 6, 7]
    assert sources == [0, 1, 2, 3, 4, 5, 6, 8, 9, 10]  # row 7 belonged to "gone"


def test_v2_rows_follow_cu_num_logits():
    batch = SimpleNamespace(req_ids=["a", "b", "c"], cu_num_logits_np=np.array([0, 1, 4, 5]))
    assert mask_kernels.v2_rows(batch, ["c", "b"]).tolist() == [4, 1, 2, 3]
    assert mask_kernels.v2_rows(batch, []).tolist() == []
    one_each = SimpleNamespace(req_ids=["a", "b", "c"], cu_num_logits_np=np.arange(6))
    assert mask_kernels.v2_rows(one_each, ["c", "a"]).tolist() == [2, 0]
    in_order = mask_kernels.v2_rows(one_each, ["a", "b", "c"])  # all, in order
    assert in_order.tolist() == [0, 1, 2] and in_order.dtype == np.int32
    assert mask_kernels.v2_rows(one_each, ["b", "a", "c"]).tolist() == [1, 0, 2]
    assert mask_kernels.v2_rows(batch, ["a", "b", "c"]).tolist() == [0, 1, 2, 3, 4]
    # A request with no logits row (a prefill chunk) beside one with drafts.
    mixed = SimpleNamespace(req_ids=["a", "b", "c", "d"],
                            cu_num_logits_np=np.array([0, 1, 1, 3, 4, 9]))
    assert mask_kernels.v2_rows(mixed, ["d", "c", "a"]).tolist() == [3, 1, 2, 0]


def test_the_warm_up_runs_inside_and_outside_inference_mode():
    """V1 calls `_dummy_sampler_run` in its profile run (inference mode) and again from the
    worker's warm-up (not): the arena made in the first is written in the second. Failed
    on an H100 (2026-12-06) with "Inplace update to inference tensor outside
    InferenceMode" before the arena's warm-up ran under inference mode itself."""

    @torch.inference_mode()
    def stock(self, hidden_states):
        return hidden_states

    runner = SimpleNamespace(device="cpu", model_config=SimpleNamespace(
        get_vocab_size=lambda: 32 * 61))  # a width no other test's arena has
    warm_up = mask_kernels._warm_up("V1")(stock)
    with torch.inference_mode():
        warm_up(runner, None)
    warm_up(runner, None)
    mask_kernels._arena.cache_clear()
