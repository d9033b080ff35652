"""Patch `row_plans`: a step's grammar bitmask as DotLLM's row plan (engine core).

Target: `StructuredOutputManager.grammar_bitmask` (vLLM 0.26,
vllm/v1/structured_output/__init__.py), which fills a [rows, V/32] int32 bitmask, one
16 KiB row per constrained row, and hands it to the workers as
`GrammarOutput.grammar_bitmask`. Only DotLLM's `mask_kernels` patch reads that field in
the workers, so here it becomes a `RowPlan`: a request on an index is one slot id (its
table lives in the workers' arenas, uploaded once), a request on llguidance its row.

The rows follow vLLM's loop exactly (one per speculative draft, drafts accepted to fill
the next row then rolled back, rows after a -1 draft unconstrained, a finished grammar
unconstrained), except that with --dotllm-device-states-mib a request on an index is
named by its device state (dotllm.mask_plan; the `device_states` patch lets such a step
sample before the host accepted the last one). What this does not cover goes to vLLM's
loop, whose bitmask the workers apply as it is: reasoning models (the loop's
reasoning-end detection) and diffusion models.
"""

from __future__ import annotations

from dotllm.vllm_ext.patching import replace_attribute

NAME = "row_plans"


def planner_of(manager):
    """The engine's `RowPlanner` (DotLLM's backend's). Device states need DotLLM's
    scheduler, which releases them (the `device_states` patch: not with a --scheduler-cls
    of the user's), and no speculative decoding (drafts move a grammar the device would
    not follow). They pay off with async scheduling; without it (vLLM's CPU platform
    turns it off) they serve the same masks."""
    config = manager.vllm_config
    return manager.backend.row_planner(
        config.scheduler_config.max_num_seqs * (1 + config.num_speculative_tokens),
        device_states=(config.num_speculative_tokens == 0
                       and config.scheduler_config.scheduler_cls is None))


def _add(plan, grammar, constrained: bool, fills: list | None) -> None:
    if constrained and not grammar.is_terminated():
        grammar.add_row(plan, fills)
    else:
        plan.unconstrained()


def _grammar_bitmask(stock):
    from dotllm.vllm_ext import backend

    def grammar_bitmask(self, requests, structured_output_request_ids,
                        scheduled_spec_decode_tokens):
        config = self.vllm_config
        if (not structured_output_request_ids or self.reasoner_cls is not None
                or config.model_config.is_diffusion
                or not isinstance(self.backend, backend.DotllmBackend)):
            return stock(self, requests, structured_output_request_ids,
                         scheduled_spec_decode_tokens)
        planner = planner_of(self)
        plan = planner.start()
        # Rows wait to be filled only where no draft moves a grammar between rows.
        fills = None if scheduled_spec_decode_tokens else []
        on_device = planner.device_states
        # Requests the device holds (EOS released theirs) are planned in runs, their
        # grammars not read: a batch in decode is nearly all such requests.
        owners, held = planner.owners, []
        for req_id in structured_output_request_ids:
            if req_id in owners:
                held.append(req_id)
                continue
            if held:
                plan.held_rows(held)
                held = []
            request = requests[req_id]
            grammar = request.structured_output_request.grammar
            # A device state set (not once terminated: then unconstrained, below) where
            # the request is in step: no token in flight but this step's own.
            if on_device and grammar.add_state_row(plan, req_id,
                                                   request.num_output_placeholders <= 1):
                continue
            plan.on_host(req_id)
            drafts = scheduled_spec_decode_tokens.get(req_id, ())
            constrained, advanced = True, 0
            for token in drafts:
                _add(plan, grammar, constrained, fills)
                if token == -1:
                    constrained = False
                elif constrained and not grammar.is_terminated():
                    if not grammar.accept_tokens(req_id, [token]):
                        raise AssertionError((token, req_id, scheduled_spec_decode_tokens))
                    advanced += 1
            _add(plan, grammar, True, fills)  # the bonus token's row
            if advanced:
                grammar.rollback(advanced)
        if held:
            plan.held_rows(held)
        if fills:
            backend.fill_rows(fills, plan.rows)
        return plan.finish()

    return grammar_bitmask


def apply(in_launcher: bool) -> bool:
    if in_launcher:
        return False
    from vllm.v1.structured_output import StructuredOutputManager

    replace_attribute(StructuredOutputManager, "grammar_bitmask", _grammar_bitmask, NAME)
    return True
