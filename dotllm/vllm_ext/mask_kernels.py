"""Patch `mask_kernels`: DotLLM's kernels apply the grammar bitmask in vLLM 0.26's runners.

Targets (worker processes):
- V1 runner, and the CPU runner that inherits it: the module global
  `vllm.v1.worker.gpu_model_runner.apply_grammar_bitmask` that `sample_tokens` calls;
- V2 runner (the default for dense models): `StructuredOutputsWorker.apply_grammar_bitmask`.

Both keep vLLM's mapping from bitmask rows to logits rows (batch order; one row per
speculative token plus the bonus token). What arrives is DotLLM's `RowPlan` (the
`row_plans` patch: table rows by slot, the rest as rows) or, where vLLM's own loop built
it, a bitmask; either goes through the worker's `MaskArena` (tables kept on the device,
the step's rows copied through pinned buffers) to the kernel `--dotllm-mask-kernel`
names, in one launch. Rows masked are counted per kernel and source (a table row, the step's, or
a device state's).

Rows named by a device state (--dotllm-device-states-mib) move their state by the token
sampled right after sampling, so sampling is wrapped too: V1's `GPUModelRunner._sample`
and V2's `GPUModelRunner.sample` (vllm/v1/worker/gpu/model_runner.py) hand the sampled
token ids to the arena that masked the step. And both runners' `_dummy_sampler_run`
(vLLM's warm-up at start) warm the arena's kernels up: the device states' Triton ops
compiled in the first constrained step otherwise (~1 s on a fresh H200).
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from dotllm.kernels.arena import MaskArena, RowPlan
from dotllm.settings import Settings
from dotllm.vllm_ext.patching import replace_attribute

NAME = "mask_kernels"
logger = logging.getLogger(__name__)


@functools.cache
def _arena(device: torch.device, words: int, runner: str) -> MaskArena:
    arena = MaskArena(device, words, kernel=Settings.from_environ().mask_kernel)
    logger.info("DotLLM applies grammar bitmasks with its %s kernel (%s model runner)",
                arena.kernel, runner)
    return arena


_masked_last: list[MaskArena] = []  # the arena that masked this worker's last step


def advance_states(sampled: torch.Tensor) -> None:
    """After a step's sampling: its device states move by the tokens sampled."""
    if _masked_last:
        _masked_last.pop().advance(sampled)


@functools.cache
def _rows_counter(kernel: str, source: str):
    """The counter of one kernel's rows from one source (its labels looked up once)."""
    return _rows_counters().labels(kernel=kernel, source=source)


@functools.cache
def _rows_counters():
    from prometheus_client import Counter

    return Counter("dotllm_mask_rows", "Logits rows masked by DotLLM's kernels, by where "
                   "the row came from: a table kept on the device (table), a table row a "
                   "device state named (state), or sent with the step (step).",
                   ["kernel", "source"])


def apply_rows(logits: torch.Tensor, plan: RowPlan | np.ndarray, sources: list[int] | None,
               targets: list[int] | np.ndarray, runner: str) -> None:
    """Mask logits[targets[i]] with the plan's row sources[i] (sources None: row i)."""
    if not len(targets):
        return
    if not isinstance(plan, RowPlan):  # vLLM's own loop filled it
        plan = RowPlan.of_rows(plan)
    index = None if sources is None else np.asarray(sources, dtype=np.int64)
    arena = _arena(logits.device, plan.words, runner)
    masked = arena.apply(logits, plan, np.asarray(targets, dtype=np.int32), index)
    _masked_last[:] = [arena]
    for source, count in zip(masked._fields, masked, strict=True):
        if count:
            _rows_counter(arena.kernel, source).inc(count)


def v1_rows(scheduler_output, grammar_output, input_batch) -> tuple[list[int], list[int]]:
    """(bitmask rows, logits rows) as vLLM 0.26's V1 `apply_grammar_bitmask` maps them."""
    spec_tokens = scheduler_output.scheduled_spec_decode_tokens
    first_logit: dict[str, int] = {}
    offset = 0
    for batch_index, req_id in enumerate(input_batch.req_ids):
        first_logit[req_id] = batch_index + offset
        offset += len(spec_tokens.get(req_id, ()))
    sources: list[int] = []
    targets: list[int] = []
    cursor = 0
    for req_id in grammar_output.structured_output_request_ids:
        count = 1 + len(spec_tokens.get(req_id, ()))
        if (start := first_logit.get(req_id)) is not None:
            sources.extend(range(cursor, cursor + count))
            targets.extend(range(start, start + count))
        cursor += count
    return sources, targets


def v2_rows(input_batch, grammar_req_ids: list[str]) -> np.ndarray:
    """Logits rows (int32) for the bitmask rows, as vLLM 0.26's V2 `StructuredOutputsWorker`
    maps them (in the worker's step, 256 requests on this CPU: ~1 us when every request is
    constrained and in batch order, ~20 us through the dict, ~51 us as a loop over ranges)."""
    req_ids = input_batch.req_ids
    cu = input_batch.cu_num_logits_np[:len(req_ids) + 1]
    counts = np.diff(cu)
    one_each = (counts == 1).all()  # a logits row a request: request i's is row i
    if one_each and grammar_req_ids == req_ids:  # all constrained, in order: no dict
        return np.arange(len(req_ids), dtype=np.int32)
    index = dict(zip(req_ids, range(len(req_ids)), strict=True))
    rows = np.array([index[req_id] for req_id in grammar_req_ids], dtype=np.int32)
    if not len(rows) or one_each:
        return rows
    starts, counts = cu[rows], counts[rows]
    ends = np.cumsum(counts)
    return (np.arange(ends[-1]) + np.repeat(starts - ends + counts, counts)).astype(np.int32)


def _v1_apply(_stock):
    def apply_grammar_bitmask(scheduler_output, grammar_output, input_batch, logits):
        sources, targets = v1_rows(scheduler_output, grammar_output, input_batch)
        apply_rows(logits, grammar_output.grammar_bitmask, sources, targets, "V1")

    return apply_grammar_bitmask


def _v2_apply(_stock):
    def apply_grammar_bitmask(self, logits, input_batch, grammar_req_ids, grammar_bitmask):
        if not grammar_req_ids:
            return
        targets = v2_rows(input_batch, grammar_req_ids)
        apply_rows(logits, grammar_bitmask, None, targets, "V2")

    return apply_grammar_bitmask


def _v1_sample(stock):
    def _sample(self, logits, spec_decode_metadata):
        output = stock(self, logits, spec_decode_metadata)
        advance_states(output.sampled_token_ids)
        return output

    return _sample


def _v2_sample(stock):
    def sample(self, hidden_states, input_batch, grammar_output):
        result = stock(self, hidden_states, input_batch, grammar_output)
        advance_states(result[0].sampled_token_ids)
        return result

    return sample


def _warm_up(runner: str):
    def wrap(stock):
        def _dummy_sampler_run(self, *args, **kwargs):
            out = stock(self, *args, **kwargs)
            words = (self.model_config.get_vocab_size() + 31) // 32
            # The stock method is decorated, this wrapper is not: V1 calls it once inside
            # inference mode (its profile run) and once outside (the worker's warm-up), and
            # the arena's tensors made in the first must not be written outside it.
            with torch.inference_mode():
                _arena(torch.device(self.device), words, runner).warm_up()
            return out

        return _dummy_sampler_run

    return wrap


def apply(in_launcher: bool) -> bool:
    if in_launcher:
        return False
    from vllm.v1.worker import gpu_model_runner
    from vllm.v1.worker.gpu import model_runner as v2_model_runner
    from vllm.v1.worker.gpu.structured_outputs import StructuredOutputsWorker

    replace_attribute(gpu_model_runner, "apply_grammar_bitmask", _v1_apply, NAME)
    replace_attribute(StructuredOutputsWorker, "apply_grammar_bitmask", _v2_apply, NAME)
    if Settings.from_environ().device_states_mib > 0:
        replace_attribute(gpu_model_runner.GPUModelRunner, "_sample", _v1_sample, NAME)
        replace_attribute(v2_model_runner.GPUModelRunner, "sample", _v2_sample, NAME)
        replace_attribute(gpu_model_runner.GPUModelRunner, "_dummy_sampler_run",
                          _warm_up("V1"), NAME)
        replace_attribute(v2_model_runner.GPUModelRunner, "_dummy_sampler_run",
                          _warm_up("V2"), NAME)
    return True
