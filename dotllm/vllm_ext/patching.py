"""How a patch finds its target and replaces it: once per process, marked with its name,
and only in the kind of process it belongs to."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType


def api_server_module(name: str, in_launcher: bool) -> ModuleType | None:
    """The API-server module `name` if this process serves the API, else None.

    The process `dotllm` started serves the API (the module is imported there if it is not
    yet); so does any process already running API-server code (the extra API servers of
    `--api-server-count`). Engine-core and worker processes never load it, and are spared
    the import.
    """
    if name in sys.modules:
        return sys.modules[name]
    return importlib.import_module(name) if in_launcher else None


def replace_attribute(owner, name: str, make, patch_name: str) -> None:
    """Set `owner.name` to `make(current)`, unless this patch already did (idempotent).

    The replacement carries `dotllm_patch = patch_name`, which tests and the idempotency
    check read.
    """
    current = getattr(owner, name)
    if getattr(current, "dotllm_patch", None) == patch_name:
        return
    replacement = make(current)
    replacement.dotllm_patch = patch_name
    setattr(owner, name, replacement)
