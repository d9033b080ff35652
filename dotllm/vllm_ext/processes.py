"""Which of vLLM's processes this is, for patches that belong to one kind of process."""

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
