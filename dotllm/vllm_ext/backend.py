"""DotLLM as vLLM 0.26's structured-output backend (`backend_types.py` interface)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import llguidance
import llguidance.hf
import numpy as np
import torch
from vllm.sampling_params import StructuredOutputsParams
from vllm.v1.structured_output.backend_types import (
    StructuredOutputBackend,
    StructuredOutputGrammar,
    StructuredOutputOptions,
)

from dotllm import embedded_model
from dotllm.compiler import llguidance_grammar
from dotllm.compiler.cache import IndexCache
from dotllm.compiler.manager import CompilationManager
from dotllm.compiler.metrics import CompileMetrics
from dotllm.compiler.pool import CompileFailed, CompilePool, PoolLimits
from dotllm.compiler.spec import ConstraintError, ConstraintSpec
from dotllm.compiler.vocabulary import Vocabulary
from dotllm.guide import Guide
from dotllm.llguidance_guide import LLGuidanceGuide, fill_rows_in_parallel
from dotllm.mask_plan import PlanBuilder, RowPlanner
from dotllm.settings import Settings
from dotllm.tiers import IndexWithFallback, ServerFault, TieredGuide
from dotllm.vllm_ext import compile_errors
from dotllm.vllm_ext.constraints import spec_from_params

logger = logging.getLogger(__name__)
# A warm disk lookup takes < 1 ms (bench/RESULTS.md): waiting this long for one costs
# little, and the request starts on the index instead of handing over later. A miss
# ends the wait at once.
_WARM_LOOKUP_S = 0.005
# Tokens a request accepts before they are added to the metric: a write costs a few us,
# and the rest of a request cut short (max_tokens) is only added when its grammar goes,
# which vLLM leaves to the cyclic garbage collector.
_COUNT_EVERY = 32
# Tokens the host's guide of a request on a device state lets the device run ahead by
# (`DotllmGrammar.follow_device`): one walk each so many steps instead of an accept a step.
_FOLLOW_EVERY = 16


def llguidance_tokenizer(tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """As vLLM's guidance backend builds it: Mistral's own tokenizers have theirs."""
    from transformers import MistralCommonBackend

    if isinstance(tokenizer, MistralCommonBackend):
        from mistral_common.guidance.tokenizer import from_mistral_tokenizer

        return from_mistral_tokenizer(tokenizer.tokenizer)
    if (native := getattr(tokenizer, "llg_tokenizer", None)) is not None:
        return native
    return llguidance.hf.from_tokenizer(tokenizer, max(vocab_size, len(tokenizer)))


class DotllmGrammar(StructuredOutputGrammar):
    def __init__(self, guide: IndexWithFallback | LLGuidanceGuide | TieredGuide,
                 eos_token_id: int, count_tokens: Callable[[str, int], None] | None = None,
                 on_eos: Callable[[str], None] | None = None):
        self.guide = guide
        self._eos = eos_token_id
        # Told the request's id when EOS ends the guide: its device state is released
        # then, so that holding one means the guide goes on (the step's plan reads only
        # the planner's owners for such requests, not their grammars).
        self._on_eos = on_eos
        # Tokens per tier, reported in batches: a metric write costs about what the index
        # tier spends on a token.
        self._count_tokens = count_tokens
        self._uncounted: dict[str, int] = {}
        # Output tokens the guide accepted; while the host follows the device
        # (`follow_device`), the request's own output list, whose tokens past those the
        # guide accepts later, in one walk.
        self._accepted = 0
        self._outputs: list[int] | None = None
        self._request_id = ""
        self._catch_up_at = 0
        self._refused = False  # a token the device moved by, the guide did not allow

    def accept_tokens(self, request_id: str, tokens: list[int]) -> bool:
        # False ends the request with an error (vLLM's scheduler); the engine keeps going.
        if self._outputs is not None:  # `tokens` are the newest of them
            self.catch_up(len(self._outputs) - len(tokens))
        if self._refused:
            return False
        return self._accept(request_id, tokens)

    def _accept(self, request_id: str, tokens: list[int]) -> bool:
        try:
            accepted = self.guide.accept_tokens(tokens)
        except ServerFault as e:
            compile_errors.record_server_fault(request_id, str(e))
            return False
        if not accepted and (error := self.guide.error):
            compile_errors.record(
                request_id, f"llguidance gave up on it: {llguidance_grammar.short(error)}",
                "gave_up")
        if not accepted:
            return False
        self._accepted += len(tokens)
        if tokens and tokens[-1] == self._eos and self._on_eos is not None:
            self._on_eos(request_id)
        if self._count_tokens is not None:
            tier = self.guide.tier
            self._uncounted[tier] = count = self._uncounted.get(tier, 0) + len(tokens)
            if count >= _COUNT_EVERY or self.guide.is_terminated():
                self._report_tokens()
        return True

    def follow_device(self, request_id: str, outputs: list[int]) -> bool:
        """The device moved this request by its newest output tokens (`outputs`, the
        request's own list, which grows in place): the guide accepts them later, every
        `_FOLLOW_EVERY` tokens or when asked anything, in one walk. A step then costs
        the host no accept a request. False, taking nothing, for EOS (it ends the guide,
        which must know at once) or once a token was refused: accept them now."""
        if self._refused or outputs[-1] == self._eos:
            return False
        if self._outputs is None:
            self._outputs, self._request_id = outputs, request_id
            if not self._catch_up_at:  # requests that start together catch up apart
                self._catch_up_at = len(outputs) + hash(request_id) % _FOLLOW_EVERY
        if len(outputs) >= self._catch_up_at:
            self.catch_up()
            self._catch_up_at = len(outputs) + _FOLLOW_EVERY
            return not self._refused
        return True

    def catch_up(self, end: int | None = None) -> None:
        """Accept the output tokens the device moved by (up to `end`); a token the guide
        does not allow ends the request at its next accept (`_refused`)."""
        outputs, self._outputs = self._outputs, None
        if outputs is None or self._refused:
            return
        behind = outputs[self._accepted:end]
        if behind and not self._accept(self._request_id, behind):
            self._refused = True
            logger.error("The host's guide refused tokens the device moved request %s "
                         "by: %s", self._request_id, behind)

    def _report_tokens(self) -> None:
        for tier, count in self._uncounted.items():
            if count:
                self._count_tokens(tier, count)
        self._uncounted.clear()

    def __del__(self):  # the request is over (a request cut short never reaches EOS)
        if self._count_tokens is not None and self._uncounted:
            self._report_tokens()
        if isinstance(self.guide, TieredGuide):
            self.guide.close()

    def validate_tokens(self, tokens: list[int]) -> list[int]:
        self.catch_up()
        try:
            return self.guide.validate_tokens(tokens)
        except ServerFault:
            return []  # the next accept_tokens meets the same fault and ends the request

    def rollback(self, num_tokens: int) -> None:
        self.catch_up()
        self.guide.rollback(num_tokens)
        self._accepted -= min(max(num_tokens, 0), self._accepted)

    def forced_tokens(self, limit: int) -> list[int]:
        """Speculative drafts of what the constraint decides from here (forced_drafts)."""
        self.catch_up()
        try:
            return self.guide.forced_tokens(limit)
        except ServerFault:
            return []  # the next accept_tokens meets the same fault and ends the request

    def forced_alone(self, tokens: list[int]) -> int:
        """How many of the drafts `tokens` are each their state's only choice."""
        self.catch_up()
        try:
            return self.guide.forced_alone(tokens)
        except ServerFault:
            return 0

    def fill_bitmask(self, bitmask: torch.Tensor, batch_index: int) -> None:
        self.fill_row(bitmask[batch_index].numpy())

    def fill_row(self, row: np.ndarray) -> None:
        self.catch_up()
        try:
            self.guide.fill_row(row)
        except ServerFault:  # only EOS: the accept that follows ends the request
            words = row.view(np.uint32)
            words.fill(0)
            words[self._eos >> 5] = 1 << (self._eos & 31)

    def add_row(self, plan: PlanBuilder, fills: list | None = None) -> None:
        """This step's mask into `plan`: its table row where the guide is on an index
        (the workers hold the table), else the row itself, filled now or, with `fills`,
        listed there as (grammar, index in plan.rows) to fill later (`fill_rows`)."""
        self.catch_up()
        if (source := self.guide.table_row()) is not None:
            plan.table_row(*source)
        elif fills is not None:
            fills.append((self, plan.direct_index()))
        else:
            self.fill_row(plan.direct_row())

    def add_state_row(self, plan: PlanBuilder, request_id: str, in_step: bool) -> bool:
        """This step's row named by the request's device state, where its guide is on an
        index and not terminated: the device's own if it holds one, else set from the
        guide's state, which must be `in_step` with every token sampled. False, planning
        nothing, otherwise."""
        if request_id in plan.planner.owners:
            plan.held_rows([request_id])  # (the guide, behind the device, need not catch up)
            return True
        if not in_step:
            return False
        self.catch_up()  # a device state set anew starts from the guide's
        if (position := self.guide.index_position()) is None:
            return False
        return plan.device_state_row(request_id, *position)

    def is_terminated(self) -> bool:
        self.catch_up()
        return self.guide.is_terminated()

    def reset(self):
        self.guide.reset()
        self._accepted, self._outputs, self._refused = 0, None, False
        self._catch_up_at = 0


def fill_rows(fills: list[tuple[DotllmGrammar, int]], rows: np.ndarray) -> None:
    """A step's rows listed by `add_row`: llguidance's masks all in one parallel call, the
    rest (a finished constraint, an index being checked) each by its own grammar."""
    matchers = []
    for grammar, i in fills:
        if (matcher := grammar.guide.matcher_for_mask()) is not None:
            matchers.append((matcher, i))
        else:
            grammar.fill_row(rows[i])
    fill_rows_in_parallel(matchers, rows)


@dataclass
class DotllmBackend(StructuredOutputBackend):
    settings: Settings = field(default_factory=Settings.from_environ)
    _planner: RowPlanner | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.vocabulary = Vocabulary.from_tokenizer(self.tokenizer, size=self.vocab_size)
        s = self.settings
        cache = IndexCache(
            memory_bytes=s.index_cache_memory_mib * 2**20,
            disk_dir=s.disk_dir(embedded_model.cache_root()),
            remote_url=s.index_cache_url or None,
            disk_bytes=s.index_cache_disk_mib * 2**20,
        )
        limits = PoolLimits(
            timeout_s=s.compile_timeout,
            max_index_bytes=s.max_index_mib * 2**20,
            max_worker_memory_bytes=s.compile_memory_bytes,
        )
        pool = CompilePool(self.vocabulary, workers=s.workers, limits=limits)
        self.metrics = CompileMetrics()
        self.manager = CompilationManager(self.vocabulary, cache, pool, self.metrics,
                                          failure_ttl_s=s.remember_failures_s)
        self._ll_tokenizer = llguidance_tokenizer(self.tokenizer, self.vocab_size)
        self._eos = self.vocabulary.eos_token_id
        levels = [f"memory {s.index_cache_memory_mib} MiB"]
        if cache.disk is not None:
            bound = f"{s.index_cache_disk_mib} MiB" if s.index_cache_disk_mib else "unbounded"
            levels.append(f"disk {cache.disk.directory} ({bound})")
        if s.index_cache_url:
            levels.append(f"shared {s.index_cache_url}")
        logger.info("DotLLM structured outputs: %d compile workers, index cache: %s",
                    s.workers, ", ".join(levels))

    def compile_spec(self, spec: ConstraintSpec,
                     on_wait: Callable[[], None] | None = None,
                     behind_prefill: Callable[[Future], None] | None = None) -> DotllmGrammar:
        """The request's guide (runs in vLLM's grammar thread pool, returns at once unless
        only the index can serve it, the engine setting says to wait for it, or the
        prompt's prefill can hide the compile):

        - the index, when it is ready (cached) or arrives within a warm disk lookup, or,
          with `behind_prefill`, by the end of the prompt's prefill;
        - llguidance alone, for what outlines-core cannot serve (refused, or failed);
        - llguidance first, then the index at a step boundary (`TieredGuide`), while the
          pool compiles it.

        `on_wait` is called before it waits for a compile (the request's prompt can
        prefill meanwhile: compile_overlap). `behind_prefill(index)` returns when the
        index is done or the request's sampling step is next, whichever comes first.
        """
        spec.check()
        engine = self.settings.constraint_engine
        refusal, reason = self.outlines_refusal(spec)
        if refusal is None:
            index = self.manager.get(spec)
            if engine == "tiered" and not (
                    index.looked_up.wait(_WARM_LOOKUP_S) and index.done()):
                try:
                    first = self.llguidance_guide(spec)
                except ConstraintError as not_llguidance:  # only the index can serve it
                    return self._indexed(index, spec, not_llguidance, on_wait)
                if behind_prefill is not None:
                    self.manager.hurry(index)  # its request now waits for it
                    behind_prefill(index)
                    in_time = (index.done() and not index.cancelled()
                               and index.exception() is None)
                    self.metrics.prefill_waits.labels(
                        outcome="index" if in_time else "llguidance").inc()
                    if in_time:
                        return self._indexed(index, spec)
                self.metrics.tier_start.labels(tier="llguidance").inc()
                started = time.monotonic()
                return self._grammar(TieredGuide(
                    first, index, self._eos,
                    lambda outcome: self._handed_over(outcome, started),
                    lambda: self.llguidance_guide(spec), self.manager.release))
            try:
                return self._indexed(index, spec, on_wait=on_wait)
            except CompileFailed as e:
                refusal, reason = str(e), e.kind
            except ConstraintError as e:
                refusal, reason = str(e), "invalid"
        if engine == "outlines":
            raise ConstraintError(refusal)
        try:
            guide = self.llguidance_guide(spec)
        except ConstraintError as e:
            raise ConstraintError(f"{refusal}; {e}") from None
        self.metrics.served_by_llguidance.labels(reason=reason).inc()
        self.metrics.tier_start.labels(tier="llguidance").inc()
        return self._grammar(guide)

    def _indexed(self, index: Future, spec: ConstraintSpec,
                 not_llguidance: ConstraintError | None = None,
                 on_wait: Callable[[], None] | None = None) -> DotllmGrammar:
        """The index's guide, waiting for it; its failure says why llguidance could not."""
        if not index.done():  # this request is blocked on the compile: it goes first
            self.manager.hurry(index)
            if on_wait is not None:
                on_wait()
        try:
            compiled = index.result()
        except (CompileFailed, ConstraintError) as e:
            if not_llguidance is None:
                raise
            raise ConstraintError(f"{e}; {not_llguidance}") from None
        self.metrics.tier_start.labels(tier="index").inc()
        return self._grammar(IndexWithFallback(Guide(compiled, self._eos),
                                               lambda: self.llguidance_guide(spec),
                                               self._handed_over))

    def _handed_over(self, outcome: str, started: float | None = None) -> None:
        self.metrics.tier_handover.labels(outcome=outcome).inc()
        if outcome == "switched" and started is not None:
            self.metrics.handover_seconds.observe(time.monotonic() - started)

    def _grammar(self, guide: IndexWithFallback | LLGuidanceGuide | TieredGuide
                 ) -> DotllmGrammar:
        return DotllmGrammar(guide, self._eos, self._count_tokens, self.release_device_state)

    def _count_tokens(self, tier: str, count: int) -> None:
        self.metrics.tier_tokens.labels(tier=tier).inc(count)

    def outlines_refusal(self, spec: ConstraintSpec) -> tuple[str | None, str]:
        """Why outlines-core will not serve `spec` here (None if it may), and the label."""
        return llguidance_grammar.outlines_refusal(spec, self.settings.constraint_engine)

    def llguidance_guide(self, spec: ConstraintSpec) -> LLGuidanceGuide:
        """A fresh guide on llguidance (ConstraintError if it cannot serve `spec`)."""
        grammar = llguidance_grammar.grammar_for(spec)
        matcher = llguidance.LLMatcher(self._ll_tokenizer, grammar)
        if matcher.is_error():
            raise ConstraintError(
                f"llguidance cannot either: {llguidance_grammar.short(matcher.get_error())}")
        return LLGuidanceGuide(matcher, self._eos)

    def compile_grammar(self, request_type: StructuredOutputOptions,
                        grammar_spec: str) -> DotllmGrammar:
        """vLLM's (type, text) key; DotLLM's own path passes whole params to compile_spec."""
        value: object = grammar_spec
        if request_type is StructuredOutputOptions.JSON_OBJECT:
            value = True
        elif request_type is StructuredOutputOptions.CHOICE:
            value = json.loads(grammar_spec)  # vLLM keys choices by their JSON text
        params = StructuredOutputsParams(**{request_type.name.lower(): value})
        return self.compile_spec(spec_from_params(params))

    @property
    def planner(self) -> RowPlanner | None:
        """The planner, once the first step made it (`row_planner`)."""
        return self._planner

    def release_device_state(self, request_id: str) -> None:
        """The request's guide ended (EOS): the device no longer follows it."""
        if self._planner is not None:
            self._planner.release(request_id)

    def row_planner(self, max_rows: int, device_states: bool = False) -> RowPlanner:
        """The one planner of this engine's steps (its slots mirror the workers' arenas);
        device states where the settings and the caller allow them."""
        if self._planner is None:
            words = (self.vocab_size + 31) // 32
            s = self.settings
            self._planner = RowPlanner(
                words, s.mask_table_slots(words), max_rows,
                blob_words=s.device_state_words() if device_states else 0,
                state_slots=4 * max_rows)
        return self._planner

    def allocate_token_bitmask(self, max_num_seqs: int) -> torch.Tensor:
        return torch.full((max_num_seqs, (self.vocab_size + 31) // 32), -1, dtype=torch.int32,
                          pin_memory=torch.cuda.is_available())

    def destroy(self):
        self.manager.shutdown()
