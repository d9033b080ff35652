"""Patch `forced_drafts`: what a constraint decides is proposed as speculative drafts.

Braces, quotes, key names and separators of a constrained answer are decided by its
constraint (dotllm/compiler/forced.py); decoded one forward pass a token they cost as
much as free text. Here they go through vLLM's speculative decoding: the model verifies
them in one pass under the grammar's masks and rejection sampling keeps the output
distribution exact (a draft the model would not have sampled is rejected, never forced).

Target: `Scheduler.update_draft_token_ids` (vLLM 0.26, vllm/v1/core/sched/scheduler.py),
which the engine core calls after each step, once the grammars have accepted the step's
tokens, with the drafts the workers' proposer made. For a request whose constraint
decides what comes next, the constraint's tokens (at most num_speculative_tokens) replace
the proposer's; every other request keeps the proposer's (validated by vLLM as before).
A user's own speculative method composes this way where vLLM calls that method (vLLM
runs such proposers without async scheduling). Without one, `dotllm serve
--dotllm-forced-drafts N` gives vLLM a proposer of DotLLM's own that proposes nothing
(`NoDrafts`, vLLM's `custom_class` method), so only constrained requests get drafts;
vLLM then schedules without async scheduling, for every request.
"""

from __future__ import annotations

from dotllm.settings import Settings
from dotllm.vllm_ext.patching import replace_attribute

NAME = "forced_drafts"
NO_DRAFTS = f"{__name__}.NoDrafts"


class NoDrafts:
    """vLLM's `custom_class` proposer that proposes nothing: the constraints' drafts are
    set in the engine core, and unconstrained requests get none."""

    def __init__(self, vllm_config):
        pass

    def load_model(self, model) -> None:
        """Nothing to load (vLLM's CPU model runner asks every proposer)."""

    def propose(self, sampled_token_ids, *args, **kwargs) -> list[list[int]]:
        return [[] for _ in sampled_token_ids]


def speculative_config(drafts: int) -> dict:
    """The --speculative-config `dotllm serve` gives vLLM when the user gave none."""
    return {"method": "custom_class", "model": NO_DRAFTS, "num_speculative_tokens": drafts}


def _with_forced_drafts(stock):
    def update_draft_token_ids(self, draft_token_ids) -> None:
        stock(self, draft_token_ids)
        limit = self.num_spec_tokens
        manager = self.structured_output_manager
        counts: dict[str, list[int]] = {}  # tier -> [drafted, their states' only choice]
        for req_id in draft_token_ids.req_ids:
            request = self.requests.get(req_id)
            if (request is None or request.is_finished() or request.is_prefill_chunk
                    or not manager.should_advance(request)):
                continue
            grammar = request.structured_output_request.grammar
            forced = getattr(grammar, "forced_tokens", None)
            if forced is None or grammar.is_terminated():
                continue
            # Never past max_tokens: a draft beyond it would be computed for nothing.
            left = request.max_tokens - request.num_output_tokens - 1
            # Validated as vLLM validates any proposer's drafts (its bitmask loop asserts
            # each is accepted); the constraint's own pass whole, in microseconds.
            if left > 0 and (tokens := grammar.validate_tokens(forced(min(limit, left)))):
                request.spec_token_ids = tokens
                count = counts.setdefault(grammar.guide.tier, [0, 0])
                count[0] += len(tokens)
                count[1] += grammar.forced_alone(tokens)
        metrics = getattr(manager.backend, "metrics", None) if manager.backend else None
        if metrics is not None:
            for tier, (drafted, alone) in counts.items():
                metrics.forced_drafts.labels(tier=tier).inc(drafted)
                metrics.forced_tokens.labels(tier=tier).inc(alone)

    return update_draft_token_ids


def apply(in_launcher: bool) -> bool:
    if in_launcher or Settings.from_environ().forced_drafts <= 0:
        return False
    from vllm.v1.core.sched.scheduler import Scheduler

    replace_attribute(Scheduler, "update_draft_token_ids", _with_forced_drafts, NAME)
    return True
