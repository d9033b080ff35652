"""CPU cost per generated token of each tier, on real-world schemas: the index (outlines-core
compiled into DotLLM's per-state tables) vs llguidance.

    python -m bench.token_cost [--sample N] [--timeout S] [--subsets ...] [--repeat R]

A token costs what vLLM asks of a request's grammar each step: fill its bitmask row, then
accept the sampled token. The token streams are the schemas' valid instances as the
model writes them (keys in schema order, outlines-core's separators), so both engines walk
the same documents; instances either engine rejects are skipped. Each stream is replayed
`--repeat` times on one guide (reset between) and the fastest replay counts.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import llguidance
import numpy as np

from bench.jsonschemabench import (
    accepts,
    embedded_tokenizer_and_vocabulary,
    in_schema_order,
    load,
    parser,
)
from dotllm.compiler import llguidance_grammar
from dotllm.compiler.cache import IndexCache
from dotllm.compiler.manager import CompilationManager
from dotllm.compiler.pool import CompileFailed, CompilePool, PoolLimits
from dotllm.compiler.spec import ConstraintError, ConstraintSpec
from dotllm.guide import Guide
from dotllm.llguidance_guide import LLGuidanceGuide
from dotllm.vllm_ext.backend import llguidance_tokenizer


def _reset(guide):
    guide.reset()
    return guide


def per_token_us(guide, tokens: list[int], row: np.ndarray, repeat: int) -> float:
    """Fastest replay of fill-then-accept over `tokens`, in microseconds a token."""
    best = float("inf")
    for _ in range(repeat):
        guide.reset()
        started = time.perf_counter_ns()
        for token in tokens:
            guide.fill_row(row)
            guide.accept_tokens([token])
        best = min(best, time.perf_counter_ns() - started)
    return best / 1000 / len(tokens)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    tokenizer, vocabulary = embedded_tokenizer_and_vocabulary()
    ll_tokenizer = llguidance_tokenizer(tokenizer, vocabulary.size)
    eos = vocabulary.eos_token_id
    row = np.empty((vocabulary.size + 31) // 32, dtype=np.int32)
    pool = CompilePool(vocabulary, workers=args.workers,
                       limits=PoolLimits(timeout_s=args.timeout))
    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:
        manager = CompilationManager(vocabulary, IndexCache(disk_dir=Path(cache_dir)), pool)
        for subset in args.subsets:
            cases = load(subset, sample=args.sample or None)
            specs = [ConstraintSpec.json_schema(c.schema) for c in cases]
            indexes = [manager.get(s) if s.outlines_refusal() is None else None for s in specs]
            index_us, ll_us, tokens_total, documents = [], [], 0, 0
            for case, spec, index in zip(cases, specs, indexes, strict=True):
                try:
                    compiled = index.result() if index is not None else None
                    grammar = llguidance_grammar.grammar_for(spec)
                except (CompileFailed, ConstraintError):
                    continue
                matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
                if compiled is None or matcher.is_error():
                    continue
                guides = (Guide(compiled, eos), LLGuidanceGuide(matcher, eos))
                for test in case.tests:
                    if not test["valid"]:
                        continue
                    text = json.dumps(in_schema_order(test["data"], case.schema),
                                      ensure_ascii=False, separators=(", ", ": "))
                    if not all(accepts(partial(_reset, g), tokenizer, text) for g in guides):
                        continue
                    tokens = tokenizer.encode(text, add_special_tokens=False)
                    index_us.append(per_token_us(guides[0], tokens, row, args.repeat))
                    ll_us.append(per_token_us(guides[1], tokens, row, args.repeat))
                    tokens_total += len(tokens)
                    documents += 1
            if not documents:
                continue
            ratios = [b / a for a, b in zip(index_us, ll_us, strict=True)]
            rows.append({
                "subset": subset, "documents": documents, "tokens": tokens_total,
                "index_us_p50": statistics.median(index_us),
                "llguidance_us_p50": statistics.median(ll_us),
                "ratio_p10": min(ratios) if len(ratios) < 2 else statistics.quantiles(
                    ratios, n=10)[0],
                "ratio_p50": statistics.median(ratios),
            })
            print(json.dumps(rows[-1]), flush=True)
        manager.shutdown()
    print("| subset | documents | tokens | index us/token p50 | llguidance us/token p50 | "
          "ratio p50 | ratio p10 |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['subset']} | {r['documents']} | {r['tokens']} | {r['index_us_p50']:.2f} | "
              f"{r['llguidance_us_p50']:.2f} | {r['ratio_p50']:.1f}x | {r['ratio_p10']:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
