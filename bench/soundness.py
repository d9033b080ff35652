"""Soundness fuzzer: what does each tier *generate*, and does every document validate?

    python -m bench.soundness [--sample N] [--walks 20] [--timeout S] [--workers W]
                              [--jobs J] [--part K/N] [--subsets ...] [--cache-dir DIR]

Feeding a schema's own test instances to an index says what it accepts, never what it
produces; a model samples from the mask, so the fuzzer does too. For each schema served,
random walks through the constraint as the server runs it: on the compiled index (Guide),
on llguidance (LLGuidanceGuide), and a tiered request that starts on llguidance and is
handed over to the index mid-document (TieredGuide, the index arriving at a random
step). Each step fills the mask row, picks an allowed token uniformly, with a growing bias
towards EOS and closing tokens so walks end, and accepts it. Every ended document is
decoded and validated with `jsonschema` against the schema served (ECMA-262 patterns,
DotLLM's enforced formats checked: `dotllm.compiler.validation`). A token the mask
allowed but the guide then refused is a failure too.

Each schema is served as a non-strict request is (`relaxation.serve`): without what no
engine here enforces, which the response would name; documents are validated against
that schema ("invalid") and, for information, against the schema as asked. Beside it,
whether stock vLLM's xgrammar compiles the schema (its served share).
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.util
import os
import random
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from bench.jsonschemabench import Case, load, parser
from dotllm import embedded_model
from dotllm.compiler import relaxation
from dotllm.compiler.mask_table import words_for
from dotllm.compiler.pool import CompileFailed
from dotllm.compiler.spec import ConstraintError, ConstraintSpec
from dotllm.compiler.validation import OutputValidator
from dotllm.compiler.vocabulary import token_bytes
from dotllm.guide import Guide
from dotllm.tiers import TieredGuide

TIERS = ("index", "llguidance", "handover")
SHARE = 4  # schemas a job takes at a time (compiled ahead of their walks)
_CLOSING = (b'"', b"}", b"]")


@dataclass
class Walk:
    tokens: list[int]
    ended: bool  # EOS accepted (else: the step budget ran out)
    refused: str | None = None  # a token the mask allowed was refused, or the guide gave up


class Walker:
    """Random walks over one tokenizer's vocabulary."""

    def __init__(self, tokenizer, vocab_size: int, seed: int = 0):
        self.eos = tokenizer.eos_token_id
        self.vocab_size = vocab_size
        self.words = words_for(vocab_size)
        table = token_bytes(tokenizer)
        self.token_text = [table.get(i, b"") for i in range(vocab_size)]
        closing = np.zeros(self.words * 32, dtype=bool)
        closing[[i for i, b in table.items() if any(c in b for c in _CLOSING)]] = True
        closing[self.eos] = True
        self.closing = np.packbits(closing, bitorder="little").view(np.int32)
        self.first_byte = np.array([t[0] if t else 256 for t in self.token_text])
        self.rng = random.Random(seed)

    def _allowed(self, row: np.ndarray) -> np.ndarray:
        words = np.flatnonzero(row)  # most rows allow few words: unpack only those
        bits = np.unpackbits(row[words].view(np.uint8), bitorder="little").reshape(-1, 32)
        word, bit = np.nonzero(bits)
        tokens = words[word] * 32 + bit
        return tokens[tokens < self.vocab_size]

    def choose(self, row: np.ndarray, step: int, horizon: int) -> int | None:
        """Uniform over the allowed tokens; past the horizon, more and more often EOS, a
        closing token, or else a token by its first byte chosen uniformly (a loop such as
        `[a-z0-9-]+` has thousands of tokens in and one byte out: by byte it is left)."""
        biased = self.rng.random() < min(0.95, step / horizon)
        if biased:
            word = self.eos >> 5
            if row[word] >> (self.eos & 31) & 1:
                return self.eos
            closing = self._allowed(row & self.closing)
            if len(closing):
                return int(closing[self.rng.randrange(len(closing))])
        allowed = self._allowed(row)
        if biased and len(allowed):
            first = self.first_byte[allowed]
            starts = np.unique(first)
            allowed = allowed[first == starts[self.rng.randrange(len(starts))]]
        return int(allowed[self.rng.randrange(len(allowed))]) if len(allowed) else None

    def walk(self, guide, max_tokens: int = 2048,
             at_step: Callable[[int], None] | None = None) -> Walk:
        """One document; `at_step(i)` runs before step i (the index arriving, say)."""
        row = np.empty(self.words, dtype=np.int32)
        horizon = self.rng.choice((8, 16, 32, 64, 128))
        tokens: list[int] = []
        for step in range(max_tokens):
            if at_step is not None:
                at_step(step)
            guide.fill_row(row)
            token = self.choose(row, step, horizon)
            if token is None:
                return Walk(tokens, False, f"no token allowed after {len(tokens)} tokens")
            if not guide.accept_tokens([token]):
                why = getattr(guide, "error", None) or "the guide refused a token its mask allowed"
                return Walk(tokens, False, f"{why} (token {token}, step {step})")
            if token == self.eos:
                return Walk(tokens, True)
            tokens.append(token)
        return Walk(tokens, False)

    def text(self, tokens: list[int]) -> str:
        return b"".join(self.token_text[t] for t in tokens).decode("utf-8", errors="strict")


@dataclass
class TierResult:
    tier: str
    served: bool = False
    reason: str = ""  # why this tier does not serve the schema
    walks: int = 0
    ended: int = 0
    invalid: int = 0
    refused: int = 0
    first_failure: str = ""  # the first failing document, and why


@dataclass
class SchemaResult:
    case: Case
    spec: ConstraintSpec | None  # what is served (relaxed where `unenforced` says)
    reason: str = ""  # why the schema is not served at all
    unenforced: list[str] = field(default_factory=list)  # left out, as a non-strict request
    tiers: dict[str, TierResult] = field(default_factory=dict)
    valid_as_asked: int = 0  # ended documents that validate against the schema as asked
    xgrammar: bool | None = None  # stock vLLM's xgrammar compiles it (None: not asked)
    seconds: float = 0.0  # its compile (waited for) and walks

    @property
    def served(self) -> bool:
        return any(t.served for t in self.tiers.values())


def _guide_factories(backend, spec: ConstraintSpec, index_timeout: float):
    """tier -> a factory of fresh guides (or the reason the tier does not serve it)."""
    eos = backend.vocabulary.eos_token_id
    factories: dict[str, Callable | str] = {}
    compiled = None
    refusal, _ = backend.outlines_refusal(spec)
    if refusal is not None:
        factories["index"] = refusal
    else:
        try:
            compiled = backend.manager.get(spec).result(timeout=index_timeout)
            factories["index"] = lambda: (Guide(compiled, eos), None)
        except (CompileFailed, ConstraintError, TimeoutError) as e:
            factories["index"] = str(e) or type(e).__name__
    try:
        backend.llguidance_guide(spec)
        factories["llguidance"] = lambda: (backend.llguidance_guide(spec), None)
    except ConstraintError as e:
        factories["llguidance"] = str(e)
    if compiled is not None and not isinstance(factories["llguidance"], str):
        def handover():
            future: Future = Future()
            guide = TieredGuide(backend.llguidance_guide(spec), future, eos, lambda _: None,
                                lambda: backend.llguidance_guide(spec))
            return guide, (future, compiled)
        factories["handover"] = handover
    else:
        factories["handover"] = "needs both tiers"
    return factories


def fuzz_schema(case: Case, backend, walker: Walker, walks: int, index_timeout: float,
                max_tokens: int = 2048) -> SchemaResult:
    try:
        served = relaxation.serve(ConstraintSpec.json_schema(case.schema), strict=False)
    except ConstraintError as e:
        return SchemaResult(case, None, str(e))
    spec = served.spec
    result = SchemaResult(case, spec, unenforced=[str(u) for u in served.unenforced])
    validator = OutputValidator(spec.schema)  # what DotLLM says it enforces
    as_asked = OutputValidator(case.schema) if served.unenforced else validator
    for tier, factory in _guide_factories(backend, spec, index_timeout).items():
        outcome = result.tiers[tier] = TierResult(tier)
        if isinstance(factory, str):
            outcome.reason = factory
            continue
        outcome.served = True
        attempts = 0
        while outcome.ended < walks and attempts < 3 * walks:
            attempts += 1
            guide, handover = factory()
            at_step = None
            if handover is not None:
                future, compiled = handover
                switch_at = walker.rng.randrange(1, 24)

                def at_step(step, future=future, compiled=compiled, switch_at=switch_at):
                    if step == switch_at:
                        future.set_result(compiled)
            walk = walker.walk(guide, max_tokens, at_step)
            outcome.walks += 1
            failure = walk.refused
            if walk.ended:
                outcome.ended += 1
                try:
                    text = walker.text(walk.tokens)
                except UnicodeDecodeError as e:
                    text, failure = repr(b"".join(walker.token_text[t] for t in walk.tokens)), \
                        f"not UTF-8: {e}"
                else:
                    if (bad := validator.check_text(text)) is not None:
                        failure = str(bad)
                    result.valid_as_asked += as_asked.check_text(text) is None
                if failure and not walk.refused:
                    outcome.invalid += 1
            else:
                text = walker.text(walk.tokens[:200]) if walk.refused else ""
            if walk.refused:
                outcome.refused += 1
            if failure and not outcome.first_failure:
                outcome.first_failure = f"{failure} | document: {text[:400]!r}"
    return result


def report(subset: str, results: list[SchemaResult], walks: int = 20) -> dict:
    """Counts per tier; `schemas_under_walks`: served schemas with fewer ended walks than
    asked (their walks ran past the step budget)."""
    row: dict = {"subset": subset, "schemas": len(results),
                 "served": sum(r.served for r in results),
                 "xgrammar_serves": sum(bool(r.xgrammar) for r in results),
                 "served_with_unenforced": sum(r.served and bool(r.unenforced) for r in results)}
    for tier in TIERS:
        outcomes = [r.tiers[tier] for r in results if tier in r.tiers and r.tiers[tier].served]
        row[tier] = {
            "schemas": len(outcomes),
            "walks": sum(o.walks for o in outcomes),
            "ended": sum(o.ended for o in outcomes),
            "invalid": sum(o.invalid for o in outcomes),
            "refused": sum(o.refused for o in outcomes),
            "schemas_failing": sum(bool(o.invalid or o.refused) for o in outcomes),
            "schemas_under_walks": sum(o.ended < walks for o in outcomes),
        }
    relaxed = [r for r in results if r.served and r.unenforced]
    row["unenforced_valid_as_asked"] = (
        f"{sum(r.valid_as_asked for r in relaxed)}/"
        f"{sum(t.ended for r in relaxed for t in r.tiers.values())}")
    return row


def failures(results: list[SchemaResult]) -> list[str]:
    """One line per failing (schema, tier): the first failing document and why."""
    return [f"{r.case.id} [{t.tier}] {t.first_failure}" for r in results
            for t in r.tiers.values() if t.first_failure]


def not_served(results: list[SchemaResult]) -> Counter:
    return Counter((r.reason or "; ".join(t.reason for t in r.tiers.values()))[:120]
                   for r in results if not r.served)


class _Job:
    """One process's share of a subset: its own backend (compile pool, llguidance) and
    walker, so that shares run side by side (`--jobs`)."""

    def __init__(self, args, seed: int):
        from bench.compile_vs_stock import stock_engines
        from bench.jsonschemabench import embedded_tokenizer_and_vocabulary
        from dotllm.settings import Settings
        from dotllm.vllm_ext.backend import DotllmBackend

        tokenizer, vocabulary = embedded_tokenizer_and_vocabulary()
        self.args = args
        self.tmp = tempfile.TemporaryDirectory()
        settings = Settings(compile_workers=args.workers, compile_timeout=args.timeout,
                            index_cache_dir=args.cache_dir or self.tmp.name)
        self.backend = DotllmBackend(None, tokenizer=tokenizer, vocab_size=vocabulary.size,
                                     settings=settings)
        self.walker = Walker(tokenizer, vocabulary.size, seed)
        self.xgrammar = None if args.no_xgrammar else stock_engines(
            tokenizer, vocabulary.size)["xgrammar"]

    def run(self, cases: list[Case]) -> list[SchemaResult]:
        for case in cases:  # compile in the background while the walks run
            try:
                spec = relaxation.serve(ConstraintSpec.json_schema(case.schema), False).spec
                if self.backend.outlines_refusal(spec)[0] is None:
                    self.backend.manager.get(spec)
            except ConstraintError:
                pass
        results = []
        for case in cases:
            started = time.monotonic()
            results.append(fuzz_schema(case, self.backend, self.walker, self.args.walks,
                                       self.args.timeout + 30))
            results[-1].seconds = time.monotonic() - started
        if self.xgrammar is not None:
            from bench.compile_vs_stock import time_engine
            for result in results:
                result.xgrammar = time_engine(self.xgrammar, [result.case.schema])[0] == 1
        return results


_job: _Job | None = None


def _start_job(args, seeds, parent: int) -> None:
    global _job
    _job = _Job(args, seeds.get())
    multiprocessing.util.Finalize(_job, _job.backend.destroy, exitpriority=10)
    threading.Thread(target=_exit_without, args=(parent,), daemon=True).start()


def _exit_without(parent: int) -> None:
    """A job whose run was killed goes too (with its compile workers), not on alone."""
    while os.getppid() == parent:
        time.sleep(1)
    _job.backend.destroy()
    os._exit(1)


def _run_share(cases: list[Case]) -> list[SchemaResult]:
    return _job.run(cases)


def main(argv: list[str] | None = None) -> int:
    options = parser(__doc__.splitlines()[0])
    options.add_argument("--walks", type=int, default=20, help="ended walks per schema and tier")
    options.add_argument("--cache-dir", help="index cache kept between runs (default: fresh)")
    options.add_argument("--seed", type=int, default=0)
    options.add_argument("--jobs", type=int, default=1,
                         help="processes side by side, each with --workers compile workers")
    options.add_argument("--part", default="1/1",
                         help="K/N: only the K-th of N slices of each subset (runs split up)")
    options.add_argument("--verbose", action="store_true", help="list every failure")
    options.add_argument("--no-xgrammar", action="store_true",
                         help="do not count what stock vLLM's xgrammar compiles")
    args = options.parse_args(argv)
    part, parts = map(int, args.part.split("/"))
    if args.jobs > 1:
        embedded_model.build()  # once, before the jobs look for it
        context = multiprocessing.get_context("spawn")
        seeds = context.Queue()
        for job in range(args.jobs):
            seeds.put(args.seed + job)
        executor = ProcessPoolExecutor(args.jobs, context, _start_job,
                                       (args, seeds, os.getpid()))
        share = executor.map
    else:
        job = _Job(args, args.seed)
        share = map
    try:
        for subset in args.subsets:
            started = time.monotonic()
            cases = load(subset, sample=args.sample or None)[part - 1::parts]
            # Small shares handed out as jobs come free: one slow schema holds up one job,
            # not a sixteenth of the subset.
            size = len(cases) if args.jobs == 1 else SHARE
            shares = [cases[i:i + size] for i in range(0, len(cases), size)]
            results = [r for done in share(_run_share if args.jobs > 1 else job.run, shares)
                       for r in done]
            row = report(subset, results, args.walks)
            row["part"] = args.part
            row["wall_s"] = round(time.monotonic() - started)
            print(json.dumps(row), flush=True)
            lines = failures(results)
            for line in lines if args.verbose else lines[:10]:
                print("  FAIL", line[:1200], flush=True)
            for reason, n in not_served(results).most_common(10 if not args.verbose else None):
                print(f"  not served x{n}: {reason}", flush=True)
            for r in results:
                short = [f"{t.tier} {t.ended}/{t.walks}" for t in r.tiers.values()
                         if t.served and t.ended < args.walks]
                if short and args.verbose:
                    print(f"  under {args.walks} ended walks: {r.case.id}: {', '.join(short)}")
            for r in sorted(results, key=lambda r: -r.seconds)[:5 if args.verbose else 0]:
                print(f"  slowest: {r.case.id} {r.seconds:.0f} s", flush=True)
    finally:
        if args.jobs > 1:
            executor.shutdown(cancel_futures=True)
        else:
            job.backend.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
