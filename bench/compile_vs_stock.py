"""Compile coverage and time: DotLLM (cold: pool compile; warm: disk cache, table loaded)
vs the engines stock vLLM 0.26 uses (xgrammar, llguidance), on JSONSchemaBench subsets,
on this machine, one run.

    python -m bench.compile_vs_stock [--sample N] [--timeout S] [--workers W]

xgrammar and llguidance run in this process with one thread (as vLLM's grammar thread
pool does on 2 cores); DotLLM's cold numbers come from its process pool (compile_coverage).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.compile_coverage import percentile, run
from bench.jsonschemabench import embedded_tokenizer_and_vocabulary, load, parser
from dotllm.compiler.cache import IndexCache, cache_key
from dotllm.compiler.mask_table import words_for
from dotllm.compiler.spec import ConstraintSpec
from dotllm.guide import Guide


def time_engine(compile_one, schemas: list[dict]) -> tuple[int, list[float]]:
    ok, times = 0, []
    for schema in schemas:
        started = time.perf_counter()
        try:
            compile_one(schema)
        except Exception:
            continue
        times.append(time.perf_counter() - started)
        ok += 1
    return ok, times


def stock_engines(tokenizer, vocab_size: int):
    import llguidance
    import llguidance.hf
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    xgr_compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)

    def xgrammar_compile(schema):
        xgr_compiler.compile_json_schema(json.dumps(schema), any_whitespace=True)

    def guidance_compile(schema):
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
        if matcher.is_error():
            raise ValueError(matcher.get_error())

    return {"xgrammar": xgrammar_compile, "llguidance": guidance_compile}


def warm_lookups(outcomes, vocabulary, cache_dir: Path) -> list[float]:
    """Fresh cache object per lookup, as after a restart: the entry mapped from disk and
    checked, a Guide made and its first mask row filled (all a first step needs)."""
    times = []
    row = np.zeros(words_for(vocabulary.size), dtype=np.int32)
    for o in outcomes:
        if o.status != "compiled":
            continue
        key = cache_key(vocabulary.digest, ConstraintSpec.json_schema(o.case.schema).key)
        cache = IndexCache(disk_dir=cache_dir)
        started = time.perf_counter()
        item, level = cache.get(key)
        Guide(item, vocabulary.eos_token_id).fill_row(row)
        times.append(time.perf_counter() - started)
        assert level == "disk" and row.any()
    return times


def summary(name: str, ok: int, total: int, times: list[float]) -> dict:
    return {"engine": name, "compiled": f"{ok}/{total}",
            "p50_ms": round(1e3 * percentile(times, 0.5), 2),
            "p90_ms": round(1e3 * percentile(times, 0.9), 2),
            "p99_ms": round(1e3 * percentile(times, 0.99), 2)}


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    tokenizer, vocabulary = embedded_tokenizer_and_vocabulary()
    engines = stock_engines(tokenizer, vocabulary.size)
    for subset in args.subsets:
        cases = load(subset, sample=args.sample or None)
        schemas = [c.schema for c in cases]
        rows = []
        for name, compile_one in engines.items():
            ok, times = time_engine(compile_one, schemas)
            rows.append(summary(name, ok, len(schemas), times))
        with tempfile.TemporaryDirectory() as tmp:
            outcomes = run(cases, tokenizer, vocabulary, args.workers, args.timeout, Path(tmp))
            cold = [o.seconds for o in outcomes if o.status == "compiled"]
            ok = len(cold)
            rows.append(summary("dotllm cold", ok, len(cases), cold))
            rows.append(summary("dotllm warm (disk)", ok, len(cases),
                                warm_lookups(outcomes, vocabulary, Path(tmp))))
        for row in rows:
            print(json.dumps({"subset": subset, **row}))


if __name__ == "__main__":
    main()
