"""Patch `device_states`: a step samples without waiting for the host to accept the last
one, where every constrained request in it is advanced on the device.

Target: `SchedulerConfig.get_scheduler_cls` (vLLM 0.26, vllm/config/scheduler.py), as
`compile_overlap` does: vLLM's scheduler (with any DotLLM mixin already there) gets
`DeviceStates` mixed in; a scheduler class the user names (device states are then off),
and everything without --dotllm-device-states-mib, are left as they are.

vLLM 0.26 marks a step `pending_structured_output_tokens` when a constrained request in
it still has a token in flight (async_scheduler.py); the engine core then defers the
step's sampling until the previous step's tokens are accepted, putting the host's accept
and mask fill between the forward pass and sampling every step (engine/core.py). A
request the workers hold a device state for (dotllm.mask_plan: its index's transitions
on the device, its state moved there by each sampled token) needs nothing from that
accept, so only the other constrained requests mark the step. A request's device state
is released when it ends, when EOS ends its guide (the host then answers for it), or when
it is preempted (vLLM may drop tokens the device already took: `reset_prefix_cache`), and
set again from the host's state when it is next in step.

One request the device does not hold (on llguidance, or its index not on the device)
would keep every step of its batch waiting for the host: with 64 real schemas at 256
requests, one of which only llguidance serves, 80-86 % of the steps did on an H200. Where
such requests are few (at most `mask_plan.SIT_OUT_SHARE` of the last plan's constrained
rows), each sits out the steps in which it has a token in flight: it samples every other
step, in step with the host, and the rest of the batch samples at once. It is gated
before the step is scheduled (`_sit_out`), not asked about in vLLM's loop over the
running requests: a hook there is a call for every request of the batch (~0.3 ms a step
of a 256-request schema mix on an H100 host).

With every request on the device, the engine core's host work a step was still a few
calls a constrained request (vLLM's accept and DotLLM's plan row, ~0.8 ms at 256
requests on the CI machine's CPU, bench/test_engine_step.py), on the step's critical
path. So a step whose requests are the last step's, all on device states the device held,
gets the last plan again (`get_grammar_bitmask`), and a request the device moved hands
its tokens to its guide every few steps in one walk (`StructuredOutputManager.
should_advance`, the second target: vLLM then neither reads its grammar nor accepts).
"""

from __future__ import annotations

from dotllm.settings import Settings
from dotllm.vllm_ext.patching import mixing_into_scheduler, replace_attribute
from dotllm.vllm_ext.row_plans import planner_of

NAME = "device_states"


class DeviceStates:
    """Mixed in before vLLM's `Scheduler` or `AsyncScheduler`; the synchronous one never
    has a token in flight, and needs only the releases."""

    def __init__(self, *args, **kwargs):
        from vllm.v1.request import RequestStatus

        super().__init__(*args, **kwargs)
        self._running = RequestStatus.RUNNING

    def schedule(self, *args, **kwargs):
        self._sit_out()
        return super().schedule(*args, **kwargs)

    def _sit_out(self) -> None:
        """The few requests the last plan needed the host for (none of them held: only a
        plan sets a device state), where they have a token in flight (one that step
        samples), sit the coming step out: vLLM's running loop passes over a request
        until its `next_decode_eligible_step` (its own gate for pipeline-parallel
        decodes), so the batch's other requests pay no call for it. Only a running
        request: one resumed from the waiting queue is not gated there."""
        planner = self._planner()
        if planner is None or not planner.need_host:
            return
        gate = self.current_step + 2  # schedule() counts the coming step first
        sat_out = 0
        for req_id in planner.need_host:
            request = self.requests.get(req_id)
            if (request is not None and request.status == self._running
                    and request.num_output_placeholders):
                request.next_decode_eligible_step = max(request.next_decode_eligible_step,
                                                        gate)
                sat_out += 1
        if sat_out:
            self.structured_output_manager.backend.metrics.steps_sat_out.inc(sat_out)

    _planner_found = None

    def _planner(self):
        """DotLLM's planner, if DotLLM serves structured outputs here (not without a
        tokenizer, for one; vLLM makes its backend with the first constrained request)."""
        if self._planner_found is not None:
            return self._planner_found
        from dotllm.vllm_ext.backend import DotllmBackend

        manager = self.structured_output_manager
        if not isinstance(manager.backend, DotllmBackend):
            return None
        self._planner_found = planner_of(manager)
        return self._planner_found

    def _release(self, request) -> None:
        if (planner := self._planner()) is not None:
            planner.release(request.request_id)

    def _update_after_schedule(self, scheduler_output) -> None:
        super()._update_after_schedule(scheduler_output)
        if not scheduler_output.pending_structured_output_tokens:
            return
        planner = self._planner()
        if planner is None or not planner.device_states:
            return
        scheduled = scheduler_output.num_scheduled_tokens.keys()
        # Those the device moves need nothing from the host: only the others are looked at.
        for req_id in scheduled - planner.moved_on_device(scheduled):
            request = self.requests[req_id]
            # After this step's own placeholder: one more is a token in flight.
            if (not request.use_structured_output or request.is_prefill_chunk
                    or request.num_output_placeholders <= 1):
                continue
            if req_id not in planner.owners:  # (nor when EOS ended its guide)
                return  # this one needs the host in step: the step stays pending
        scheduler_output.pending_structured_output_tokens = False
        self.structured_output_manager.backend.metrics.steps_not_deferred.inc()

    _repeatable = None  # (what must stay, the scheduled request ids, GrammarOutput)

    def get_grammar_bitmask(self, scheduler_output):
        """The last step's plan again where it is the same: the same requests scheduled,
        in the same order, each named by the device state it already had (the device
        moved them all), and none of them released, set or ended since. A batch in
        decode then costs no call a request here (vLLM's own loop over the step's
        requests included)."""
        planner = self._planner()
        if planner is None or not planner.device_states:
            return super().get_grammar_bitmask(scheduler_output)
        scheduled = list(scheduler_output.num_scheduled_tokens)
        last = self._repeatable
        if (last is not None and last[0] == planner.changes and last[1] == scheduled
                and scheduler_output.has_structured_output_requests):
            self.structured_output_manager.backend.metrics.plans_repeated.inc()
            return last[2]
        output = super().get_grammar_bitmask(scheduler_output)
        self._repeatable = None
        if (output is not None and planner.last_plan_on_device
                and len(output.structured_output_request_ids) == sum(
                    (req := self.requests.get(r)) is not None and req.use_structured_output
                    for r in scheduled)):
            # (no constrained request in its prompt: one would join the plan later; one
            # ended since it was scheduled is not scheduled again)
            self._repeatable = (planner.changes, scheduled, output)
        return output

    def _preempt_request(self, request, timestamp: float) -> None:
        super()._preempt_request(request, timestamp)
        self._release(request)

    def _free_request(self, request, delay_free_blocks: bool = False):
        self._release(request)
        if request.use_structured_output and (structured := request.structured_output_request):
            grammar = structured._grammar  # (not the property: it may still be compiling)
            if hasattr(grammar, "catch_up"):
                grammar.catch_up()  # the last tokens checked, and counted
        return super()._free_request(request, delay_free_blocks)


def _should_advance(stock):
    """vLLM asks before it hands a request's new tokens to its grammar: a request the
    device moved by them (its device state held) hands them over later, all at once
    (`DotllmGrammar.follow_device`), so a step costs no accept a request."""

    def should_advance(self, request) -> bool:
        if not request.use_structured_output:  # (vLLM asks of every request a step)
            return False
        planner = getattr(self.backend, "planner", None)  # None: not DotLLM's backend
        if (planner is not None and request.request_id in planner.owners
                and request.structured_output_request._grammar.follow_device(
                    request.request_id, request._output_token_ids)):
            return False
        return stock(self, request)

    return should_advance


def apply(in_launcher: bool) -> bool:
    if in_launcher or Settings.from_environ().device_states_mib <= 0:
        return False
    from vllm.config.scheduler import SchedulerConfig
    from vllm.v1.structured_output import StructuredOutputManager

    replace_attribute(SchedulerConfig, "get_scheduler_cls",
                      mixing_into_scheduler(DeviceStates), NAME)
    replace_attribute(StructuredOutputManager, "should_advance", _should_advance, NAME)
    return True
