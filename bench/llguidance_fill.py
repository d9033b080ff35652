"""A step's llguidance rows: one Python call a row (DotLLM before 2026-12-05, and vLLM's
guidance backend below 128 rows) against one call for the whole step
(`fill_rows_in_parallel`: llguidance's own threads, the GIL dropped once).

    python -m bench.llguidance_fill [--rows 64 256] [--threads 1 2 8] [--steps 16]

Each row is a request of its own, walking its own answer (a random token its mask allows
each step), on the equal-work scenarios' long string (bench/scenarios.py: the llguidance
tier's scenario) and on the order schema (llguidance's too: outlines-core refuses its
`maximum`); the figure is microseconds a row, over a walk of --steps steps.
"""

from __future__ import annotations

import argparse
import time

import llguidance
import numpy as np

from bench import scenarios
from bench.jsonschemabench import embedded_tokenizer_and_vocabulary
from dotllm.compiler import llguidance_grammar
from dotllm.compiler.spec import ConstraintSpec
from dotllm.llguidance_guide import LLGuidanceGuide
from dotllm.vllm_ext.backend import llguidance_tokenizer

SCHEMAS = {"long-string": scenarios.batch("long-string", 1, 128)[0].body,
           "order": {"structured_outputs": {"json": scenarios.ORDER}}}


def _walk(spec: ConstraintSpec, n: int, steps: int, fill, tokenizer, vocabulary) -> float:
    """Seconds a row a fill takes over `steps` steps of `n` requests, each step at states
    never filled before (llguidance builds its lexer states as a request first reaches
    them, as in a server); the requests advance by a token their mask allows (the same
    tokens whatever `fill` is: the same seed, the same masks)."""
    rng = np.random.default_rng(0)
    ll = llguidance_tokenizer(tokenizer, vocabulary.size)
    grammar = llguidance_grammar.grammar_for(spec)
    guides = [LLGuidanceGuide(llguidance.LLMatcher(ll, grammar), vocabulary.eos_token_id)
              for _ in range(n)]
    rows = np.zeros((n, (vocabulary.size + 31) // 32), dtype=np.int32)
    spent = 0.0
    for _ in range(steps):
        started = time.perf_counter()
        fill(guides, rows)
        spent += time.perf_counter() - started
        for guide, row in zip(guides, rows, strict=True):
            allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))
            allowed = allowed[allowed != vocabulary.eos_token_id]
            if len(allowed) and not guide.is_terminated():
                guide.accept_tokens([int(rng.choice(allowed))])
    return spent / steps / n


def each_row(guides, rows) -> None:
    for guide, row in zip(guides, rows, strict=True):
        guide.fill_row(row)


def one_call(threads: int):
    executor = llguidance.LLExecutor(threads)

    def fill(guides, rows) -> None:
        llguidance.numpy.fill_next_token_bitmask_par(
            executor, [(g.matcher_for_mask(), i) for i, g in enumerate(guides)], rows)
    return fill


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args(argv)
    tokenizer, vocabulary = embedded_tokenizer_and_vocabulary()
    print("| schema | rows | a call a row, us/row | "
          + " | ".join(f"one call, {t} threads, us/row" for t in args.threads) + " |")
    print("|---|---|---|" + "---|" * len(args.threads))
    for name, body in SCHEMAS.items():
        spec = ConstraintSpec.json_schema(body["structured_outputs"]["json"])
        for n in args.rows:
            cells = [_walk(spec, n, args.steps, fill, tokenizer, vocabulary)
                     for fill in (each_row, *map(one_call, args.threads))]
            print(f"| {name} | {n} | " + " | ".join(f"{c * 1e6:.1f}" for c in cells) + " |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
