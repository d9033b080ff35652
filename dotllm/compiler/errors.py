"""The error every layer of the compiler raises for a constraint the client got wrong."""

from __future__ import annotations


class ConstraintError(ValueError):
    """The constraint itself is invalid or unsupported: the client's error (HTTP 400).

    `reason` labels the refusal on /metrics: "invalid", "limit" (a --dotllm-max-* bound),
    "strict" (a strict schema with what no engine here enforces)."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason
