"""The error every layer of the compiler raises for a constraint the client got wrong."""

from __future__ import annotations


class ConstraintError(ValueError):
    """The constraint itself is invalid or unsupported: the client's error (HTTP 400)."""
