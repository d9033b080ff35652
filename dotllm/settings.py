"""DotLLM's engine settings: set from `dotllm serve` options, read in the engine process.

vLLM starts the engine core in a process of its own, so the settings travel as
environment variables, which every process vLLM starts inherits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

_PREFIX = "DOTLLM_"


def default_compile_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) // 2))


@dataclass(frozen=True)
class CompilerSettings:
    compile_workers: int = 0  # 0: half the cores, at most 4
    compile_timeout_s: float = 60.0
    max_index_mib: int = 256
    max_compile_memory_mib: int = 0  # address-space cap per compile worker (0: none)
    index_cache_memory_mib: int = 1024
    index_cache_dir: str = ""  # "" : <cache dir>/indexes; "off": no disk cache
    index_cache_url: str = ""  # fsspec URL of a shared cache, "" : none

    def to_environ(self) -> dict[str, str]:
        return {_PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_environ(cls, environ=os.environ) -> CompilerSettings:
        values = {}
        for f in fields(cls):
            raw = environ.get(_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = type(f.default)(raw)
        return cls(**values)

    @property
    def workers(self) -> int:
        return self.compile_workers or default_compile_workers()

    def disk_dir(self, cache_root: Path) -> Path | None:
        if self.index_cache_dir == "off":
            return None
        return Path(self.index_cache_dir) if self.index_cache_dir else cache_root / "indexes"
