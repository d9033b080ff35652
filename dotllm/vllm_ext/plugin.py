"""The `vllm.general_plugins` entry point: the one place DotLLM installs its hooks.

vLLM loads general plugins in every process it starts (API server, engine core,
workers). The plugin acts only when the process tree was started by `dotllm`, which
sets ACTIVE_ENV to its own pid before vLLM starts any process (and registers the hooks in
its own, where vLLM loaded plugins while parsing the options); a plain `vllm serve` in
the same environment, or `dotllm serve` with an explicit stock backend, gets stock vLLM.
"""

from __future__ import annotations

import logging
import os

from dotllm.vllm_ext import (
    compile_errors,
    compile_overlap,
    cpu_shm,
    cpu_spec_expand,
    device_states,
    engine_backend,
    forced_drafts,
    heap_trim,
    legacy_fields,
    mask_kernels,
    ready_grammar,
    request_validation,
    row_plans,
    server_identity,
    unenforced_report,
)

ACTIVE_ENV = "DOTLLM_SERVE"

# Each patch is a module with NAME and apply(in_launcher: bool) -> bool (True when it
# patched something in this process). apply() must be idempotent.
PATCHES = (
    server_identity, request_validation, legacy_fields, unenforced_report, engine_backend,
    compile_errors, compile_overlap, device_states, ready_grammar, row_plans, mask_kernels,
    heap_trim, forced_drafts, cpu_shm, cpu_spec_expand,
)


def activate(environ=os.environ) -> None:
    """Called by `dotllm` in its own process, before vLLM starts any."""
    environ[ACTIVE_ENV] = str(os.getpid())


def launcher_pid() -> int | None:
    """The pid of the `dotllm` process that started this tree, or None under plain vLLM."""
    value = os.environ.get(ACTIVE_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def register() -> list[str]:
    """Install DotLLM's patches in this process; returns the names of those applied."""
    pid = launcher_pid()
    if pid is None:
        return []
    _log_like_vllm()
    in_launcher = pid == os.getpid()
    applied = [patch.NAME for patch in PATCHES if patch.apply(in_launcher)]
    if applied:
        logging.getLogger(__name__).debug(
            "DotLLM hooks installed (pid %d): %s", os.getpid(), ", ".join(applied))
    return applied


def _log_like_vllm() -> None:
    """DotLLM's log lines go where vLLM's go, in the same format and at the same level."""
    import vllm.logger  # noqa: F401  (configures vLLM's logging)

    source, ours = logging.getLogger("vllm"), logging.getLogger("dotllm")
    ours.handlers = list(source.handlers)
    ours.setLevel(source.level)
    ours.propagate = not source.handlers
