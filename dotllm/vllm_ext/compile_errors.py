"""Patch `compile_errors`: a constraint that fails to compile in the engine is a 400 that
says why, not vLLM 0.26's bare "500 Internal server error" (or, streaming, an empty
stream that looks like success).

Most bad constraints are refused before queueing (`request_validation`); what only the
compile can tell (a regex outlines-core rejects, a compile past its time or size budget,
a crashed worker) surfaces in the engine core, where vLLM finishes the request with
FinishReason.ERROR and no message. The message travels in the error output's
`stop_reason`, which vLLM already carries from the engine to the API server:

- engine core: `StructuredOutputManager._create_grammar` failures are recorded by
  request id (`record`), and the scheduler's `update_from_output`, which builds every
  output a step returns, fills their error outputs' `stop_reason` afterwards: only in a
  step while a failure waits to be taken, so other steps pay no call an output (a wrapper
  around each output's construction cost ~0.8 us a request a step, every request);
- API server: `AsyncLLM.generate`, the stream of outputs every OpenAI endpoint reads,
  raises such an output as an error that is both vLLM's GenerationError (so streams
  report it in-band) and a ValueError (so vLLM answers 400 BadRequestError).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from http import HTTPStatus

from dotllm.vllm_ext.patching import api_server_module, replace_attribute

NAME = "compile_errors"
MARKER = "dotllm-constraint-error: "
SERVER_FAULT = "dotllm-server-fault: "  # the server's fault: a 503 the client may retry

# A request aborted before its error output is built never collects its entry: bounded,
# and dropped once this old if the scheduler does not know the request (a failure may be
# recorded before the scheduler has its request, never this long before).
_MAX_PENDING = 10_000
STALE_S = 60.0
_failures: OrderedDict[str, tuple[str, float]] = OrderedDict()  # id -> (reason, recorded)
_lock = threading.Lock()


def record(request_id: str, message: str, reason: str = "invalid") -> None:
    """Engine core: remember why this request's constraint failed (`reason` labels the
    refusal on /metrics)."""
    _put(request_id, f"{MARKER}{reason}: {message}")


def record_server_fault(request_id: str, message: str) -> None:
    """Engine core: remember that this request ended for a fault of the server's (its
    client gets a 503 that says to retry, never a 400)."""
    _put(request_id, SERVER_FAULT + message)


def _put(request_id: str, reason: str) -> None:
    with _lock:
        _failures[request_id] = (reason, time.monotonic())
        while len(_failures) > _MAX_PENDING:
            _failures.popitem(last=False)


def _take(request_id: str) -> str | None:
    with _lock:
        entry = _failures.pop(request_id, None)
    return None if entry is None else entry[0]


def fill_stop_reasons(outputs: dict, finish_error, known) -> None:
    """Error outputs (by client: `EngineCoreOutputs`) get their recorded reasons; stale
    entries of requests the scheduler does not know (`known`) are dropped."""
    for batch in outputs.values():
        for output in batch.outputs:
            if (output.finish_reason == finish_error and output.stop_reason is None
                    and (reason := _take(output.request_id)) is not None):
                output.stop_reason = reason
    horizon = time.monotonic() - STALE_S
    with _lock:
        for request_id in [r for r, (_, at) in _failures.items()
                           if at < horizon and r not in known]:
            del _failures[request_id]


def _filling_stop_reasons(update_from_output, finish_error):
    def filled(self, *args, **kwargs):
        outputs = update_from_output(self, *args, **kwargs)
        if _failures:  # rare: a constraint failed
            fill_stop_reasons(outputs, finish_error, self.requests)
        return outputs

    return filled


def _raising_constraint_failures(generate, error_cls):
    from dotllm.compiler.metrics import count_refusal

    class ConstraintCompileError(error_cls, ValueError):
        """vLLM's GenerationError with the status of a client error (400)."""

        def __init__(self, message: str):
            super().__init__(message)
            self.status_code = HTTPStatus.BAD_REQUEST

    class ConstraintServerFault(error_cls):
        """vLLM's GenerationError as a 503: the server's fault, worth a retry."""

        def __init__(self, message: str):
            super().__init__(message)
            self.status_code = HTTPStatus.SERVICE_UNAVAILABLE

    async def generate_outputs(self, *args, **kwargs):
        async for output in generate(self, *args, **kwargs):
            for completion in getattr(output, "outputs", ()):
                reason = completion.stop_reason
                if not isinstance(reason, str):
                    continue
                if reason.startswith(MARKER):
                    label, _, message = reason[len(MARKER):].partition(": ")
                    count_refusal(label)
                    raise ConstraintCompileError(f"Invalid structured output: {message}")
                if reason.startswith(SERVER_FAULT):
                    raise ConstraintServerFault(
                        f"Structured output failed: {reason[len(SERVER_FAULT):]}")
            yield output

    return generate_outputs


def apply(in_launcher: bool) -> bool:
    from vllm.v1.core.sched import scheduler
    from vllm.v1.engine import FinishReason

    replace_attribute(scheduler.Scheduler, "update_from_output",
            lambda f: _filling_stop_reasons(f, FinishReason.ERROR), NAME)

    async_llm = api_server_module("vllm.v1.engine.async_llm", in_launcher)
    protocol = api_server_module("vllm.entrypoints.openai.engine.protocol", in_launcher)
    if async_llm and protocol:
        replace_attribute(async_llm.AsyncLLM, "generate",
                lambda f: _raising_constraint_failures(f, protocol.GenerationError), NAME)
    return True
