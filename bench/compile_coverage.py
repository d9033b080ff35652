"""Coverage, compile time and correctness of DotLLM's compiler on JSONSchemaBench subsets.

    python -m bench.compile_coverage [--sample N] [--timeout S] [--workers W] [--subsets ...]

For each schema: refused (with the reason), failed to compile (timeout, size, outlines-core
error) or compiled; compiled indexes are checked against the schema's instances: every
invalid instance must be rejected (soundness), and the share of valid instances accepted
is reported (outlines-core emits object keys in schema order and one optional space,
so some valid spellings are out of reach by design). Cold cache: a fresh temporary disk
cache each run.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from bench.jsonschemabench import (
    Case,
    accepts,
    embedded_tokenizer_and_vocabulary,
    in_schema_order,
    load,
    parser,
)
from dotllm.compiler.cache import IndexCache
from dotllm.compiler.manager import CompilationManager
from dotllm.compiler.pool import CompileFailed, CompilePool, PoolLimits
from dotllm.compiler.spec import ConstraintError, ConstraintSpec
from dotllm.guide import Guide


@dataclass
class Outcome:
    case: Case
    status: str  # compiled | refused | timeout | too_large | invalid | crash
    reason: str = ""
    seconds: float = 0.0  # compile time in a pool worker
    valid_accepted: int = 0
    valid_total: int = 0
    invalid_accepted: list = field(default_factory=list)
    invalid_total: int = 0


def run(cases: list[Case], tokenizer, vocabulary, workers: int, timeout: float,
        cache_dir: Path, on_compiled=None) -> list[Outcome]:
    """Compiles every case in a pool; `on_compiled(outcome, compiled, tokenizer,
    vocabulary)` (default: `check`) looks at each index that compiled."""
    on_compiled = on_compiled or check
    pool = CompilePool(vocabulary, workers=workers, limits=PoolLimits(timeout_s=timeout))
    manager = CompilationManager(vocabulary, IndexCache(disk_dir=cache_dir), pool)
    pending: list[tuple[Case, str, Future | None, Outcome | None]] = []
    for case in cases:
        try:
            spec = ConstraintSpec.json_schema(case.schema)
            spec.check()
            if (refusal := spec.outlines_refusal()) is not None:
                raise ConstraintError(refusal)
        except ConstraintError as e:
            pending.append((case, "", None, Outcome(case, "refused", str(e))))
            continue
        pending.append((case, manager.key_for(spec), manager.get(spec), None))
    outcomes = []
    for case, key, future, outcome in pending:
        if outcome is None:
            try:
                compiled = future.result()
                outcome = Outcome(case, "compiled", seconds=manager.compile_seconds.get(key, 0))
                on_compiled(outcome, compiled, tokenizer, vocabulary)
            except CompileFailed as e:
                outcome = Outcome(case, e.kind, str(e))
        outcomes.append(outcome)
    manager.shutdown()
    return outcomes


def check(outcome: Outcome, compiled, tokenizer, vocabulary) -> None:
    def factory():
        return Guide(compiled, vocabulary.eos_token_id)

    for test in outcome.case.tests:
        text = json.dumps(in_schema_order(test["data"], outcome.case.schema), ensure_ascii=False)
        ok = accepts(factory, tokenizer, text)
        if test["valid"]:
            outcome.valid_total += 1
            outcome.valid_accepted += ok
        else:
            outcome.invalid_total += 1
            if ok:
                outcome.invalid_accepted.append(text)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def report(subset: str, outcomes: list[Outcome]) -> dict:
    statuses = Counter(o.status for o in outcomes)
    times = [o.seconds for o in outcomes if o.status == "compiled"]
    compiled = [o for o in outcomes if o.status == "compiled"]
    row = {
        "subset": subset,
        "schemas": len(outcomes),
        **{k: statuses.get(k, 0) for k in
           ("compiled", "refused", "timeout", "too_large", "invalid", "crash")},
        "compile_p50_s": round(percentile(times, 0.5), 3),
        "compile_p90_s": round(percentile(times, 0.9), 3),
        "compile_p99_s": round(percentile(times, 0.99), 3),
        "valid_accepted": f"{sum(o.valid_accepted for o in compiled)}/"
                          f"{sum(o.valid_total for o in compiled)}",
        "invalid_accepted": f"{sum(len(o.invalid_accepted) for o in compiled)}/"
                            f"{sum(o.invalid_total for o in compiled)}",
    }
    return row


def main() -> None:
    options = parser(__doc__.splitlines()[0])
    options.add_argument("--verbose", action="store_true", help="list refusals and failures")
    args = options.parse_args()
    tokenizer, vocabulary = embedded_tokenizer_and_vocabulary()
    for subset in args.subsets:
        cases = load(subset, sample=args.sample or None)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.monotonic()
            outcomes = run(cases, tokenizer, vocabulary, args.workers, args.timeout, Path(tmp))
            row = report(subset, outcomes)
            row["wall_s"] = round(time.monotonic() - started, 1)
        print(json.dumps(row))
        if args.verbose:
            for o in outcomes:
                if o.status != "compiled" or o.invalid_accepted:
                    print(f"  {o.case.id}: {o.status} {o.reason[:150]}")
                    for text in o.invalid_accepted[:2]:
                        print(f"      invalid accepted: {text[:200]}")


if __name__ == "__main__":
    main()
