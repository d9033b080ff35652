"""Prometheus metrics of constraint compilation, served on vLLM's /metrics.

They are recorded in the engine-core process and read by the API server, so `dotllm
serve` runs prometheus_client in multiprocess mode (PROMETHEUS_MULTIPROC_DIR), as vLLM
itself does with several API servers.
"""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram

_COMPILE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class CompileMetrics:
    """What `CompilationManager` reports; one instance per process (names are global)."""

    def __init__(self, registry=None):
        kwargs = {"registry": registry} if registry is not None else {}
        self.requests = Counter(
            "dotllm_constraint_requests", "Constraint lookups by requests.", **kwargs)
        self.cache_hits = Counter(
            "dotllm_constraint_cache_hits", "Compiled constraints found in a cache level.",
            ["level"], **kwargs)
        self.corrupt_entries = Counter(
            "dotllm_constraint_cache_corrupt", "Cache entries dropped for failing a checksum.",
            ["level"], **kwargs)
        self.deduplicated = Counter(
            "dotllm_constraint_deduplicated",
            "Requests that waited on a compile another request had started.", **kwargs)
        self.compiles = Counter(
            "dotllm_constraint_compiles", "Constraints compiled (cache misses).", **kwargs)
        self.compile_seconds = Histogram(
            "dotllm_constraint_compile_seconds", "Time to compile a constraint in the pool.",
            buckets=_COMPILE_BUCKETS, **kwargs)
        self.failures = Counter(
            "dotllm_constraint_failures",
            "Constraints that failed: invalid, timeout, too_large, crash.", ["reason"],
            **kwargs)
        self.served_by_llguidance = Counter(
            "dotllm_constraint_llguidance",
            "Requests served by llguidance because outlines-core could not: grammar, "
            "structural_tag, keywords, invalid, timeout, too_large, crash; or configured "
            "(--dotllm-constraint-engine llguidance).", ["reason"],
            **kwargs)
        self.tier_start = Counter(
            "dotllm_constraint_tier_start", "Requests by the engine they started on: index "
            "(outlines-core, ready) or llguidance.", ["tier"], **kwargs)
        self.tier_handover = Counter(
            "dotllm_constraint_tier_handover",
            "Requests started on llguidance while their index compiled, by how it ended: "
            "switched, mismatch (stayed), or the compile's failure.", ["outcome"], **kwargs)
        self.tier_tokens = Counter(
            "dotllm_constraint_tier_tokens",
            "Tokens accepted by constrained requests, by the engine that guided them: index "
            "or llguidance (added every 32 tokens and when a request ends).", ["tier"],
            **kwargs)
        self.cancelled = Counter(
            "dotllm_constraint_cancelled",
            "Queued compiles cancelled because every request that wanted them had gone "
            "away.", **kwargs)
        self.cache_bytes = Gauge(
            "dotllm_constraint_cache_bytes",
            "Bytes of compiled constraints by cache level: memory (bounded by "
            "--dotllm-index-cache-memory-mib), disk (--dotllm-index-cache-disk-mib; the "
            "directory as this server last saw it).", ["level"],
            multiprocess_mode="livesum", **kwargs)
        self.pending_write_bytes = Gauge(
            "dotllm_constraint_cache_pending_write_bytes",
            "Bytes of compiled constraints in use from memory and still being written to "
            "the disk and remote levels, behind the requests that wait for them.",
            multiprocess_mode="livesum", **kwargs)
        self.handover_seconds = Histogram(
            "dotllm_constraint_handover_seconds",
            "Time requests ran on llguidance before moving to their compiled index.",
            buckets=_COMPILE_BUCKETS, **kwargs)
        self.prefill_while_compiling = Counter(
            "dotllm_constraint_prefill_tokens_while_compiling",
            "Prompt tokens computed while the request's constraint was still being made "
            "(--dotllm-compile-overlap): compile time hidden behind prefill.", **kwargs)
        self.prefill_waits = Counter(
            "dotllm_constraint_prefill_waits",
            "Requests of the tiered engine whose prompt was long enough to wait for their "
            "index behind its prefill, by what served their first token: index (it came in "
            "time) or llguidance (the prefill ended first; the index took over later).",
            ["outcome"], **kwargs)
        self.forced_drafts = Counter(
            "dotllm_forced_draft_tokens",
            "Speculative draft tokens proposed from what constraints decide "
            "(--dotllm-forced-drafts), by the engine that decided them; the model verifies "
            "them (vLLM's vllm:spec_decode_num_accepted_tokens counts those it kept).",
            ["tier"], **kwargs)
        self.forced_tokens = Counter(
            "dotllm_forced_tokens",
            "Of the forced draft tokens, those their state allowed alone (the index's "
            "canonical forced runs; llguidance's fast-forward): any model accepts them.",
            ["tier"], **kwargs)
        self.steps_not_deferred = Counter(
            "dotllm_steps_sampled_without_host",
            "Engine steps with constrained requests, all advanced on the device "
            "(--dotllm-device-states-mib), whose sampling did not wait for the host to "
            "accept the previous step's tokens (stock vLLM defers it).", **kwargs)
        self.plans_repeated = Counter(
            "dotllm_plans_repeated",
            "Steps whose mask plan was the previous step's again (the same requests, all "
            "on device states the device held), sent without planning a request.", **kwargs)
        self.steps_sat_out = Counter(
            "dotllm_steps_sat_out",
            "Steps a constrained request the device does not hold sat out, its previous "
            "token still in flight, so that the rest of its batch (advanced on the device) "
            "need not wait for the host.", **kwargs)
        self.queue_length = Gauge(
            "dotllm_constraint_pool_queue_length", "Compiles waiting for a pool worker.",
            multiprocess_mode="livesum", **kwargs)


@functools.cache
def _refusals() -> Counter:
    return Counter("dotllm_constraint_refusals",
                   "Requests refused (HTTP 400) for their constraint, by reason: invalid, "
                   "limit (a --dotllm-max-* bound), strict (what no engine here enforces), "
                   "or the compile's failure: timeout, too_large, crash, gave_up "
                   "(llguidance mid-answer).", ["reason"])


def count_refusal(reason: str) -> None:
    """One refused request (API server, where every refusal is answered)."""
    _refusals().labels(reason=reason).inc()


@functools.cache
def unenforced_counter() -> Counter:
    """Requests served with a schema keyword not enforced (API server; one per process)."""
    return Counter("dotllm_constraint_unenforced",
                   "JSON-schema requests served without enforcing a keyword no engine here "
                   "enforces (not strict), by keyword; the response says which and whether "
                   "the output validated.", ["keyword"])
