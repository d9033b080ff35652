"""DotLLM's engine settings: set from `dotllm serve` options, read in the engine process.

vLLM starts the engine core in a process of its own, so the settings travel as
environment variables (DOTLLM_<FIELD>), which every process vLLM starts inherits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from dotllm.compiler.limits import Limits

_PREFIX = "DOTLLM_"
_MAX_AUTO_COMPILE_MEMORY = 8 * 2**30
MASK_KERNELS = ("auto", "cuda", "triton", "torch")  # dotllm.kernels' implementations
CONSTRAINT_ENGINES = ("tiered", "outlines", "llguidance")


def default_compile_workers(cores: int | None = None) -> int:
    """The cores less the engine's share (a quarter, at least 2: the API server, the
    engine core and its model worker run beside), at least 1, at most 16. Compiles queued
    behind a few workers of a many-core machine held requests for tens of seconds."""
    cores = cores or os.cpu_count() or 2
    return max(1, min(16, cores - max(2, cores // 4)))


def _option(help: str, choices: tuple[str, ...] | None = None, **kwargs):
    return field(metadata={"help": help, "choices": choices}, **kwargs)


@dataclass(frozen=True)
class Settings:
    constraint_engine: str = _option(
        "What serves constraints: tiered (llguidance at once while outlines-core compiles "
        "the index, then the index), outlines (requests wait for their index; what "
        "outlines-core cannot serve is a 400) or llguidance (never compiles).",
        choices=CONSTRAINT_ENGINES, default="tiered")
    compile_workers: int = _option(
        "Processes compiling constraints at once (0: the cores less a quarter, at least 2, "
        "left to the engine; at most 16).", default=0)
    compile_timeout: float = _option(
        "Seconds a constraint may compile before its worker is killed and the request "
        "gets a 400.", default=60.0)
    remember_failures_s: float = _option(
        "Seconds a constraint that failed to compile is remembered (its requests go "
        "straight to llguidance, or get the same 400) before it is compiled again.",
        default=600.0)
    max_index_mib: int = _option(
        "Largest compiled constraint (index and mask table) kept, in MiB; larger ones "
        "are refused with a 400.", default=256)
    max_compile_memory_mib: int = _option(
        "Memory a compile may take in a worker, in MiB (0: half the machine's memory "
        "shared among the workers, at most 8 GiB each; -1: no bound); a compile over it "
        "ends its worker and fails that constraint only.", default=0)
    max_schema_kib: int = _option(
        "Largest JSON schema (or grammar, choice list) a request may send, in KiB; "
        "larger is a 400.", default=Limits.schema_kib)
    max_schema_depth: int = _option(
        "Deepest nesting of objects and arrays in a request's JSON schema; deeper is a "
        "400.", default=Limits.depth)
    max_choices: int = _option(
        "Most values in a `choice` list or a schema's `enum`; more is a 400.",
        default=Limits.choices)
    max_regex_chars: int = _option(
        "Longest `regex` constraint, in characters; longer is a 400.",
        default=Limits.regex_chars)
    index_cache_memory_mib: int = _option(
        "Memory for compiled constraints kept ready, in MiB (large and seldom used go "
        "first).",
        default=1024)
    index_cache_disk_mib: int = _option(
        "Disk for compiled constraints, in MiB (least recently used go; 0: unbounded).",
        default=4096)
    index_cache_dir: str = _option(
        "Disk cache of compiled constraints (default: <cache dir>/indexes; 'off': none).",
        default="")
    mask_kernel: str = _option(
        "Kernel that applies token bitmasks to the logits: auto (the fastest available "
        "here), cuda, triton or torch.", default="auto")
    index_cache_url: str = _option(
        "Shared cache of compiled constraints as an fsspec URL (a directory, "
        "s3://bucket/prefix, ...), read after the disk cache and written after compiles.",
        default="")
    compile_overlap: str = _option(
        "Prefill a request's prompt while its constraint compiles, holding back only the "
        "step that samples (on), or hold the whole request until it is ready, as vLLM "
        "does (off).", choices=("on", "off"), default="on")
    mask_table_mib: int = _option(
        "Memory for compiled constraints' mask tables in each model worker, on its device, "
        "in MiB (least recently used out first): a step names a table row by one integer "
        "instead of sending it (0: every row sent every step).", default=256)
    device_states_mib: int = _option(
        "Memory for compiled constraints' transitions in each model worker, on its device, "
        "in MiB: a request on an index then moves from state to state there, from the "
        "token just sampled, and with async scheduling a step's sampling no longer waits "
        "for the host to accept the last step's tokens (default 512 on a GPU, 0: off, the "
        "default on CPU, where vLLM schedules without async scheduling; not with "
        "speculative decoding).", default=0)
    forced_drafts: int = _option(
        "Tokens a constrained request's constraint decides next (braces, key names, "
        "separators), proposed as speculative drafts the model verifies in one pass, at "
        "most this many a step (0: off). Without a --speculative-config of the user's, "
        "vLLM then schedules without async scheduling.", default=0)
    heap_trim_s: float = _option(
        "Seconds between the moments each server process hands the heap memory it freed "
        "back to the system (glibc's malloc_trim; 0: never).", default=10.0)

    def to_environ(self) -> dict[str, str]:
        return {_PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_environ(cls, environ=os.environ) -> Settings:
        values = {}
        for f in fields(cls):
            raw = environ.get(_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = type(f.default)(raw)
        return cls(**values)

    @property
    def workers(self) -> int:
        return self.compile_workers or default_compile_workers()

    @property
    def limits(self) -> Limits:
        return Limits(schema_kib=self.max_schema_kib, depth=self.max_schema_depth,
                      choices=self.max_choices, regex_chars=self.max_regex_chars)

    @property
    def compile_memory_bytes(self) -> int:
        """The memory bound of one compile (0: none)."""
        if self.max_compile_memory_mib > 0:
            return self.max_compile_memory_mib * 2**20
        if self.max_compile_memory_mib < 0:
            return 0
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return min(_MAX_AUTO_COMPILE_MEMORY, physical // 2 // self.workers)

    def mask_table_slots(self, words: int) -> int:
        """Rows of `words` int32 each that --dotllm-mask-table-mib holds."""
        return self.mask_table_mib * 2**20 // (4 * words)

    def device_state_words(self) -> int:
        """int32 words of transitions --dotllm-device-states-mib holds."""
        return self.device_states_mib * 2**20 // 4

    def disk_dir(self, cache_root: Path) -> Path | None:
        if self.index_cache_dir == "off":
            return None
        return Path(self.index_cache_dir) if self.index_cache_dir else cache_root / "indexes"
