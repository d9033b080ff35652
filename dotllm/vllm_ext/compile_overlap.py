"""Patch `compile_overlap`: a request's prompt prefills while its constraint compiles.

Target: `SchedulerConfig.get_scheduler_cls` (vLLM 0.26, vllm/config/scheduler.py), which
picks `Scheduler` or `AsyncScheduler` when no --scheduler-cls is given: it returns the
same class with `CompileOverlap` mixed in. A scheduler class the user names is left as it
is, and so is everything with --dotllm-compile-overlap off.

vLLM holds a request whose grammar is not ready before its prefill
(WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR), so compile time adds to time to first token.
The grammar is first needed by the step that samples, the one that schedules the last
prompt token. So a request whose constraint waits for a compile (`mark`ed by DotLLM's
backend: most constraints are ready in milliseconds, and splitting their prompt would
only add a step) is let in while it has prompt left to compute, and each step schedules
at most up to its last prompt token; the step that samples waits for the grammar. A
constraint that fails meanwhile ends the request with its error, which frees its KV
blocks. The cap goes through the one method both of the scheduler's paths call before
allocating slots, `_mamba_block_aligned_split` (vLLM calls it where
`need_mamba_block_aligned_split`, for Mamba models only; for those it still runs
first). Requests without a constraint are scheduled exactly as before, and so are
seeded requests on a CPU: vLLM 0.26's CPU runner fails on a seeded request's partial
prefill (it rewinds the request's generator offset, which a CPU generator does not have).

The tiered engine uses the overlap too: a request whose prompt takes more than one step
to prefill, and whose index is not ready, waits for it behind that prefill
(`prefill_waiter`) instead of starting on llguidance at once; when the step that computes
the last of its prompt but one is scheduled and the index is still compiling, the
scheduler tells its grammar thread (`_want_grammar`), which starts it on llguidance then,
the index to take over later. A short prompt would gain nothing: a compile that finishes
within one step was there at the warm lookup.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future

from dotllm.settings import Settings
from dotllm.vllm_ext.patching import mixing_into_scheduler, replace_attribute

NAME = "compile_overlap"


_MARK = "dotllm_compiling"
_WANTED = "dotllm_grammar_wanted"  # set when the request's sampling step is next
_MIXED_IN = "dotllm_compile_overlap"  # on the StructuredOutputManager its scheduler uses


def mark(constraint) -> None:
    """Called from the grammar thread of a request (its `StructuredOutputRequest`)
    whose constraint is about to wait for a compile."""
    setattr(constraint, _MARK, True)


def prefill_waiter(manager, request) -> Callable[[Future], None] | None:
    """For the request's grammar thread: a wait for its index that ends when the index
    is done or the request's sampling step is next; None where the prompt fits in one
    step, or no scheduler here overlaps (the wait would never be cut short). A request
    the scheduler has not reached within a compile's time limit stops waiting too (its
    grammar thread is not held for a full queue)."""
    if not getattr(manager, _MIXED_IN, False):
        return None
    if request.num_prompt_tokens <= manager.vllm_config.scheduler_config.max_num_batched_tokens:
        return None
    constraint = request.structured_output_request
    limit_s = manager.backend.settings.compile_timeout

    def wait(index: Future) -> None:
        wanted = threading.Event()
        setattr(constraint, _WANTED, wanted)  # before the mark: the scheduler may set it
        mark(constraint)
        index.add_done_callback(lambda _: wanted.set())
        wanted.wait(limit_s)

    return wait


def _want_grammar(request) -> None:
    """The request's grammar is wanted now (its sampling step is next, or it is gone):
    a wait behind its prefill ends."""
    constraint = request.structured_output_request
    if (wanted := getattr(constraint, _WANTED, None)) is not None:
        wanted.set()


def _compiling(request) -> bool:
    """Whether the request's grammar waits for a compile (not ready, not failed)."""
    constraint = request.structured_output_request
    return (constraint is not None and getattr(constraint, _MARK, False)
            and isinstance(constraint._grammar, Future) and not constraint._grammar.done())


class CompileOverlap:
    """Mixed in before vLLM's `Scheduler` or `AsyncScheduler`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._model_split = self.need_mamba_block_aligned_split  # vLLM's, for Mamba models
        self._on_cpu = self.vllm_config.device_config.device_type == "cpu"
        backend = self.structured_output_manager.backend
        self._metrics = getattr(backend, "metrics", None)
        setattr(self.structured_output_manager, _MIXED_IN, True)

    def _may_split(self, request) -> bool:
        return not (self._on_cpu and request.sampling_params is not None
                    and request.sampling_params.seed is not None)

    def _prompt_left(self, request) -> int:
        """Prompt tokens before the last that are neither computed nor in the prefix cache."""
        done = request.num_computed_tokens
        kv = self.kv_cache_manager
        if done == 0 and kv.enable_caching and not request.skip_reading_prefix_cache:
            done = kv.coordinator.find_longest_cache_hit(request.block_hashes,
                                                         request.num_tokens - 1)[1]
        return request.num_tokens - 1 - done

    def _try_promote_blocked_waiting_request(self, request) -> bool:
        from vllm.v1.request import RequestStatus

        # Let it prefill only while there is prompt to compute: a request capped to no
        # tokens on the waiting path would stop the waiting queue for the step.
        if (request.status == RequestStatus.WAITING_FOR_STRUCTURED_OUTPUT_GRAMMAR
                and _compiling(request)):
            if self._may_split(request) and self._prompt_left(request) > 0:
                request.status = RequestStatus.WAITING
                return True
            _want_grammar(request)  # nothing to prefill: a wait behind it is over
        return super()._try_promote_blocked_waiting_request(request)

    def schedule(self, *args, **kwargs):
        # Asked of every request every step, the cap cost ~0.6 us a request on the CI
        # machine's CPU (~160 us of a 256-decode step, on its critical path): it is asked
        # only in steps where a request has no output yet (one waiting, or one still in
        # its prompt: only such a request may be capped), or the model's own split is.
        self.need_mamba_block_aligned_split = bool(
            self._model_split or self.waiting or self.skipped_waiting
            or any(not r.num_output_tokens for r in self.running))
        return super().schedule(*args, **kwargs)

    def _mamba_block_aligned_split(self, request, num_new_tokens: int,
                                   num_new_local_computed_tokens: int = 0,
                                   num_external_computed_tokens: int = 0) -> int:
        if self._model_split:
            num_new_tokens = super()._mamba_block_aligned_split(
                request, num_new_tokens, num_new_local_computed_tokens,
                num_external_computed_tokens)
        constraint = request.structured_output_request
        # A request that has output had its grammar (the common case: a decode step).
        if constraint is None or request.num_output_tokens:
            return num_new_tokens
        compiling = _compiling(request)
        if not compiling and not isinstance(constraint.grammar, Exception):
            return num_new_tokens
        done = (request.num_computed_tokens + num_new_local_computed_tokens
                + num_external_computed_tokens)
        capped = max(0, min(num_new_tokens, request.num_tokens - 1 - done))
        if not compiling:  # failed while the prompt prefilled: the request ends with it
            from vllm.v1.request import RequestStatus

            self.grammar_compile_error_reqs.add(request.request_id)
            # A waiting request scheduled nothing would stop the waiting queue.
            return 0 if request.status == RequestStatus.RUNNING else capped
        if capped and self._metrics is not None:
            self._metrics.prefill_while_compiling.inc(capped)
        if done + capped >= request.num_tokens - 1:  # the prompt is in: sampling is next
            _want_grammar(request)
        return capped

    def _free_request(self, request, delay_free_blocks: bool = False):
        _want_grammar(request)  # (gone while its grammar thread waited behind its prefill)
        return super()._free_request(request, delay_free_blocks)


def apply(in_launcher: bool) -> bool:
    if in_launcher or Settings.from_environ().compile_overlap != "on":
        return False
    from vllm.config.scheduler import SchedulerConfig

    replace_attribute(SchedulerConfig, "get_scheduler_cls",
                      mixing_into_scheduler(CompileOverlap), NAME)
    return True
