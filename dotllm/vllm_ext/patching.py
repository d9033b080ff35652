"""How a patch finds its target and replaces it: once per process, marked with its name,
and only in the kind of process it belongs to."""

from __future__ import annotations

import functools
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
    """Set `owner.name` to `make(current)`, unless this patch already did (idempotent,
    also when other patches wrapped the same attribute since).

    The replacement carries `dotllm_patch = patch_name` (which tests read) and
    `dotllm_wraps`, what it replaced.
    """
    current = getattr(owner, name)
    if patch_name in patches_on(current):
        return
    replacement = make(current)
    replacement.dotllm_patch = patch_name
    replacement.dotllm_wraps = current
    setattr(owner, name, replacement)


def patches_on(attribute) -> list[str]:
    """The DotLLM patches wrapped around an attribute, outermost first."""
    names = []
    while attribute is not None and (name := getattr(attribute, "dotllm_patch", None)):
        names.append(name)
        attribute = getattr(attribute, "dotllm_wraps", None)
    return names


@functools.cache
def with_mixin(mixin: type, base: type) -> type:
    """`base` with `mixin` first in its MRO (one class per pair)."""
    return type(f"{base.__name__}With{mixin.__name__}", (mixin, base), {})


def mixing_into_scheduler(mixin: type):
    """A `replace_attribute` maker for vLLM's `SchedulerConfig.get_scheduler_cls`: the class
    vLLM picks (`Scheduler` or `AsyncScheduler`, with any mixin already there) gets
    `mixin`; a --scheduler-cls of the user's own is left as it is."""
    def make(stock):
        def get_scheduler_cls(self):
            scheduler = stock(self)
            if self.scheduler_cls is not None:
                return scheduler
            return with_mixin(mixin, scheduler)

        return get_scheduler_cls

    return make
