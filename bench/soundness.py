"""Soundness fuzzer: what does each tier *generate*, and does every document validate?

    python -m bench.soundness [--sample N] [--walks 20] [--timeout S] [--workers W]
                              [--jobs J] [--part K/N] [--subsets ...] [--cache-dir DIR]
                              [--records FILE]

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

With `--records FILE` each schema's result is appended to FILE (JSON lines) as soon as it
is known, and schemas FILE already has are not run again: a run killed part way (a
device call's time limit) goes on where it stopped, and runs on several machines are
reported together from their files concatenated.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.util
import os
import random
import re
import re._constants as re_constants  # Python's regex parser: ECMA-262 patterns read
import re._parser as re_parser  # closely enough to spell them
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field

import numpy as np

from bench.jsonschemabench import Case, load, parser
from dotllm import embedded_model
from dotllm.compiler import enforcement, relaxation
from dotllm.compiler.mask_table import words_for
from dotllm.compiler.pool import CompileFailed
from dotllm.compiler.spec import ConstraintError, ConstraintSpec
from dotllm.compiler.validation import OutputValidator
from dotllm.compiler.vocabulary import token_bytes
from dotllm.guide import Guide
from dotllm.tiers import TieredGuide

TIERS = ("index", "llguidance", "handover")
MAX_BUDGET = 16  # times max_tokens a walk may grow to where none ends
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
        self.closing = self._mask([i for i, b in table.items()
                                   if any(c in b for c in _CLOSING)] + [self.eos])
        # Inside a string `}` and `]` are text: only a quote closes it.
        self.closing_string = self._mask([i for i, b in table.items() if b[:1] == b'"'])
        self.first_byte = np.array([t[0] if t else 256 for t in self.token_text])
        self.single_byte = np.array([t[0] if len(t) == 1 else 256 for t in self.token_text])
        self.byte_token = {t[0]: i for i, t in enumerate(self.token_text) if len(t) == 1}
        self.rng = random.Random(seed)

    def _mask(self, tokens: list[int]) -> np.ndarray:
        bits = np.zeros(self.words * 32, dtype=bool)
        bits[tokens] = True
        return np.packbits(bits, bitorder="little").view(np.int32)

    def _allowed(self, row: np.ndarray) -> np.ndarray:
        words = np.flatnonzero(row)  # most rows allow few words: unpack only those
        bits = np.unpackbits(row[words].view(np.uint8), bitorder="little").reshape(-1, 32)
        word, bit = np.nonzero(bits)
        tokens = words[word] * 32 + bit
        return tokens[tokens < self.vocab_size]

    def choose(self, row: np.ndarray, step: int, horizon: int,
               spelled: np.ndarray | None = None, in_string: bool = False,
               typed: int | None = None) -> int | None:
        r"""Uniform over the allowed tokens; past the horizon, more and more often EOS, a
        closing token, the token `typed` (the next byte of a string the schema's patterns
        match), or else a token by its first byte chosen uniformly (a loop such as
        `[a-z0-9-]+` has thousands of tokens in and one byte out: by byte it is left),
        among the tokens `spelled` marks where it allows some (a string that must contain
        `\d+\.\d+` is left by writing digits and dots, not any of 200 bytes)."""
        biased = self.rng.random() < min(0.95, step / horizon)
        if biased:
            if _allows(row, self.eos):
                return self.eos
            closing = self._allowed(row & (self.closing_string if in_string else self.closing))
            if len(closing):
                return int(closing[self.rng.randrange(len(closing))])
            if typed is not None and _allows(row, typed):
                return typed
        allowed = self._allowed(row)
        if biased and len(allowed):
            if spelled is not None and spelled[allowed].any():
                allowed = allowed[spelled[allowed]]
            first = self.first_byte[allowed]
            starts = np.unique(first)
            allowed = allowed[first == starts[self.rng.randrange(len(starts))]]
        return int(allowed[self.rng.randrange(len(allowed))]) if len(allowed) else None

    def walk(self, guide, max_tokens: int = 2048,
             at_step: Callable[[int], None] | None = None,
             spelled: np.ndarray | None = None, witnesses: tuple[bytes, ...] = ()) -> Walk:
        r"""One document; `at_step(i)` runs before step i (the index arriving, say);
        `spelled`: tokens preferred where the walk must find its way out; `witnesses`:
        strings the schema's patterns match, typed a byte at a time inside a string that
        will not close (`\.geodatabase$` is not met by chance)."""
        row = np.empty(self.words, dtype=np.int32)
        horizon = self.rng.choice((8, 16, 32, 64, 128))
        tokens: list[int] = []
        in_string = escaped = False
        witness, typed_bytes = b"", 0  # the witness being typed, and how far
        for step in range(max_tokens):
            if at_step is not None:
                at_step(step)
            guide.fill_row(row)
            typed = None
            if in_string and witnesses:
                if typed_bytes == len(witness):
                    witness, typed_bytes = self.rng.choice(witnesses), 0
                typed = self.byte_token.get(witness[typed_bytes])
            token = self.choose(row, step, horizon, spelled, in_string, typed)
            typed_bytes = typed_bytes + 1 if token == typed else len(witness)
            if token is None:
                return Walk(tokens, False, f"no token allowed after {len(tokens)} tokens")
            if not guide.accept_tokens([token]):
                why = getattr(guide, "error", None) or "the guide refused a token its mask allowed"
                return Walk(tokens, False, f"{why} (token {token}, step {step})")
            if token == self.eos:
                return Walk(tokens, True)
            tokens.append(token)
            for byte in self.token_text[token]:  # where the JSON text is: in a string?
                if escaped:
                    escaped = False
                elif in_string and byte == 0x5C:
                    escaped = True
                elif byte == 0x22:
                    in_string = not in_string
        return Walk(tokens, False)

    def spelled(self, alphabet: np.ndarray | None) -> np.ndarray | None:
        """The one-byte tokens of `alphabet`'s bytes (a mask over the vocabulary): where a
        pattern must be met, a byte at a time, or `...` and `--` tokens write past it."""
        return None if alphabet is None else alphabet[self.single_byte]

    def text(self, tokens: list[int]) -> str:
        return b"".join(self.token_text[t] for t in tokens).decode("utf-8", errors="strict")


def _allows(row: np.ndarray, token: int) -> bool:
    return bool(row[token >> 5] >> (token & 31) & 1)


def pattern_witnesses(schema) -> tuple[bytes, ...]:
    """For each of a schema's patterns a short string it matches (printable ASCII, nothing
    JSON escapes), built from the pattern's tree and checked with `re.search`."""
    found = []
    for node, _ in enforcement.nodes(schema):
        pattern = node.get("pattern")
        if not isinstance(pattern, str):
            continue
        try:
            witness = _witness(re_parser.parse(pattern))
            matches = re.search(pattern, witness) is not None
        except (re.error, RecursionError, OverflowError, ValueError):
            continue
        if matches and witness and witness.isascii() and witness.isprintable() \
                and '"' not in witness and "\\" not in witness:
            found.append(witness.encode())
    return tuple(found)


def _witness(parsed) -> str:
    """The shortest-minded string of a parsed pattern: each repeat its minimum, each
    branch its first, each class its first member."""
    out = []
    for op, arg in parsed:
        if op is re_constants.LITERAL:
            out.append(chr(arg))
        elif op in (re_constants.ANY, re_constants.NOT_LITERAL):
            out.append("x" if op is re_constants.ANY or arg != ord("x") else "y")
        elif op is re_constants.IN:
            out.append(_class_member(arg))
        elif op is re_constants.CATEGORY:
            out.append(_CATEGORY_MEMBER.get(arg, "x"))
        elif op in _REPEATS:
            out.append(_witness(arg[2]) * min(arg[0], 64))
        elif op in (re_constants.SUBPATTERN, re_constants.ATOMIC_GROUP):
            out.append(_witness(arg[-1]))
        elif op is re_constants.BRANCH:
            out.append(_witness(arg[1][0]))
        elif op is not re_constants.AT:  # anchors spell nothing; lookarounds, backrefs..
            raise ValueError(op)
    return "".join(out)


_REPEATS = (re_constants.MAX_REPEAT, re_constants.MIN_REPEAT, re_constants.POSSESSIVE_REPEAT)
_CATEGORY_MEMBER = {re_constants.CATEGORY_DIGIT: "0", re_constants.CATEGORY_WORD: "a",
                    re_constants.CATEGORY_SPACE: " ", re_constants.CATEGORY_NOT_DIGIT: "x",
                    re_constants.CATEGORY_NOT_WORD: "-", re_constants.CATEGORY_NOT_SPACE: "x"}


def _class_member(items) -> str:
    if items and items[0][0] is re_constants.NEGATE:
        excluded = {chr(a) for op, a in items[1:] if op is re_constants.LITERAL}
        return next(c for c in "xyz0_-" if c not in excluded)  # checked by re.search
    op, arg = items[0]
    if op is re_constants.LITERAL:
        return chr(arg)
    if op is re_constants.RANGE:
        return chr(arg[0])
    return _CATEGORY_MEMBER.get(arg, "x")


def pattern_alphabet(schema) -> np.ndarray | None:
    r"""The bytes a schema's patterns spell out (literals, small classes, `\d`), as a mask
    over bytes and 256 (no byte: always False); None without patterns."""
    alphabet = np.zeros(257, dtype=bool)
    for node, _ in enforcement.nodes(schema):
        if isinstance(node.get("pattern"), str):
            _spell(node["pattern"], alphabet)
    return alphabet if alphabet.any() else None


def _spell(pattern: str, alphabet: np.ndarray) -> None:
    try:
        parsed = re_parser.parse(pattern)
    except (re.error, RecursionError, OverflowError):
        return
    items = list(parsed)
    while items:
        op, arg = items.pop()
        if op is re_constants.LITERAL and arg < 128:
            alphabet[arg] = True
        elif op is re_constants.RANGE and arg[1] - arg[0] < 64 and arg[1] < 128:
            alphabet[arg[0]:arg[1] + 1] = True
        elif op is re_constants.CATEGORY and arg is re_constants.CATEGORY_DIGIT:
            alphabet[ord("0"):ord("9") + 1] = True
        elif op is re_constants.IN:
            items.extend(arg)
        elif op in (re_constants.MAX_REPEAT, re_constants.MIN_REPEAT):
            items.extend(arg[2])
        elif op is re_constants.SUBPATTERN:
            items.extend(arg[3])
        elif op is re_constants.BRANCH:
            items.extend(i for branch in arg[1] for i in branch)


@dataclass
class TierResult:
    tier: str
    served: bool = False
    reason: str = ""  # why this tier does not serve the schema
    walks: int = 0
    ended: int = 0
    invalid: int = 0
    refused: int = 0
    mismatched: int = 0  # hand-overs the index refused: the walk stayed on llguidance
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

    def record(self) -> dict:
        """What the report needs, as one JSON line of `--records`."""
        return {"subset": self.case.subset, "id": self.case.id, "served": self.served,
                "reason": self.reason, "unenforced": self.unenforced,
                "tiers": {name: asdict(t) for name, t in self.tiers.items()},
                "valid_as_asked": self.valid_as_asked, "xgrammar": self.xgrammar,
                "seconds": round(self.seconds, 1)}


def _guide_factories(backend, spec: ConstraintSpec, index_timeout: float):
    """(tier, a factory of fresh guides or the reason the tier does not serve it), the
    llguidance tier first: its walks run while the index compiles."""
    eos = backend.vocabulary.eos_token_id

    def fresh_llguidance():
        return backend.llguidance_guide(spec), None
    try:
        backend.llguidance_guide(spec)
        llguidance: Callable | str = fresh_llguidance
    except ConstraintError as e:
        llguidance = str(e)
    yield "llguidance", llguidance
    compiled = None
    refusal, _ = backend.outlines_refusal(spec)
    if refusal is not None:
        yield "index", refusal
    else:
        try:
            compiled = backend.manager.get(spec).result(timeout=index_timeout)
        except (CompileFailed, ConstraintError, TimeoutError) as e:
            yield "index", str(e) or type(e).__name__
        else:
            yield "index", lambda: (Guide(compiled, eos), None)
    if compiled is None or isinstance(llguidance, str):
        yield "handover", "needs both tiers"
        return

    def handover():
        future: Future = Future()
        outcomes: list[str] = []
        guide = TieredGuide(backend.llguidance_guide(spec), future, eos, outcomes.append,
                            lambda: backend.llguidance_guide(spec))
        return guide, (future, compiled, outcomes)
    yield "handover", handover


def fuzz_schema(case: Case, backend, walker: Walker, walks: int, index_timeout: float,
                max_tokens: int = 2048) -> SchemaResult:
    try:
        served = relaxation.serve(ConstraintSpec.json_schema(case.schema), strict=False)
    except ConstraintError as e:
        return SchemaResult(case, None, str(e))
    spec = served.spec
    result = SchemaResult(case, spec, unenforced=[str(u) for u in served.unenforced])
    validator = OutputValidator(spec.schema)  # what DotLLM says it enforces
    spelled = walker.spelled(pattern_alphabet(spec.schema))
    witnesses = pattern_witnesses(spec.schema)
    as_asked = OutputValidator(case.schema) if served.unenforced else validator
    for tier, factory in _guide_factories(backend, spec, index_timeout):
        outcome = result.tiers[tier] = TierResult(tier)
        if isinstance(factory, str):
            outcome.reason = factory
            continue
        outcome.served = True
        attempts, budget, unended = 0, max_tokens, 0
        while outcome.ended < walks and attempts < 3 * walks:
            attempts += 1
            guide, handover = factory()
            at_step, outcomes = None, []
            if handover is not None:
                future, compiled, outcomes = handover
                switch_at = walker.rng.randrange(1, 24)

                def at_step(step, future=future, compiled=compiled, switch_at=switch_at):
                    if step == switch_at:
                        future.set_result(compiled)
            walk = walker.walk(guide, budget, at_step, spelled, witnesses)
            outcome.walks += 1
            outcome.mismatched += "mismatch" in outcomes
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
                if not walk.refused:
                    unended += 1
                if unended == 3:
                    # Three more ran out of budget: the shortest document may be
                    # longer (`minItems: 600` of objects is some 9,000 tokens).
                    budget, unended = min(2 * budget, MAX_BUDGET * max_tokens), 0
            if walk.refused:
                outcome.refused += 1
            if failure and not outcome.first_failure:
                outcome.first_failure = f"{failure} | document: {text[:400]!r}"
    return result


def report(subset: str, records: list[dict], walks: int = 20) -> dict:
    """Counts per tier over `SchemaResult.record()`s; `schemas_under_walks`: served
    schemas with fewer ended walks than asked (their walks ran past the step budget)."""
    row: dict = {"subset": subset, "schemas": len(records),
                 "served": sum(r["served"] for r in records),
                 "xgrammar_serves": sum(bool(r["xgrammar"]) for r in records),
                 "served_with_unenforced": sum(r["served"] and bool(r["unenforced"])
                                               for r in records)}
    for tier in TIERS:
        outcomes = [r["tiers"][tier] for r in records
                    if r["tiers"].get(tier, {}).get("served")]
        row[tier] = {
            "schemas": len(outcomes),
            **{count: sum(o.get(count, 0) for o in outcomes)
               for count in ("walks", "ended", "invalid", "refused", "mismatched")},
            "schemas_failing": sum(bool(o["invalid"] or o["refused"]) for o in outcomes),
            "schemas_under_walks": sum(o["ended"] < walks for o in outcomes),
        }
    relaxed = [r for r in records if r["served"] and r["unenforced"]]
    row["unenforced_valid_as_asked"] = (
        f"{sum(r['valid_as_asked'] for r in relaxed)}/"
        f"{sum(t['ended'] for r in relaxed for t in r['tiers'].values())}")
    return row


def failures(records: list[dict]) -> list[str]:
    """One line per failing (schema, tier): the first failing document and why."""
    return [f"{r['id']} [{tier}] {t['first_failure']}" for r in records
            for tier, t in r["tiers"].items() if t["first_failure"]]


def not_served(records: list[dict]) -> Counter:
    return Counter((r["reason"] or "; ".join(t["reason"] for t in r["tiers"].values()))[:120]
                   for r in records if not r["served"])


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

    def run(self, cases: list[Case]) -> list[dict]:
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
        return [result.record() for result in results]


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


def _run_share(cases: list[Case]) -> list[dict]:
    return _job.run(cases)


def _recorded(path: str | None) -> dict[tuple[str, str], dict]:
    if not path or not os.path.exists(path):
        return {}
    records = {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the last line of a run killed mid-write
                continue
            records[record["subset"], record["id"]] = record
    return records


def _stands(record: dict, case: Case, walks: int) -> bool:
    """A record still stands (`--rerun`): each tier that served the schema ended its walks,
    none was left out by a compile worker's failure, and DotLLM serves the schema as it
    did then (the same keywords left out)."""
    if any(t["served"] and (t["ended"] < walks or t["refused"])
           or "compile worker" in t["reason"]  # the fuzzer's own pool failed it
           for t in record["tiers"].values()):
        return False
    try:
        served = relaxation.serve(ConstraintSpec.json_schema(case.schema), strict=False)
    except ConstraintError:
        return bool(record["reason"])
    return not record["reason"] and record["unenforced"] == [str(u) for u in served.unenforced]


def _print_report(subset: str, records: list[dict], args, wall_s: float) -> None:
    row = report(subset, records, args.walks)
    row["part"] = args.part
    row["wall_s"] = round(wall_s)
    print(json.dumps(row), flush=True)
    lines = failures(records)
    for line in lines if args.verbose else lines[:10]:
        print("  FAIL", line[:1200], flush=True)
    for reason, n in not_served(records).most_common(10 if not args.verbose else None):
        print(f"  not served x{n}: {reason}", flush=True)
    if not args.verbose:
        return
    for r in records:
        short = [f"{tier} {t['ended']}/{t['walks']}" for tier, t in r["tiers"].items()
                 if t["served"] and t["ended"] < args.walks]
        if short:
            print(f"  under {args.walks} ended walks: {r['id']}: {', '.join(short)}")
    for r in sorted(records, key=lambda r: -r["seconds"])[:5]:
        print(f"  slowest: {r['id']} {r['seconds']:.0f} s", flush=True)


class _Shares:
    """Runs shares of cases in this process (one job) or in `--jobs` processes, yielding
    each share's records as it is done; the jobs start only when there is work."""

    def __init__(self, args):
        self.args = args
        self.executor: ProcessPoolExecutor | None = None
        self.job: _Job | None = None

    def run(self, cases: list[Case]):
        if not cases:
            return
        if self.args.jobs == 1:
            self.job = self.job or _Job(self.args, self.args.seed)
            yield from (self.job.run([case]) for case in cases)
            return
        if self.executor is None:
            embedded_model.build()  # once, before the jobs look for it
            context = multiprocessing.get_context("spawn")
            seeds = context.Queue()
            for job in range(self.args.jobs):
                seeds.put(self.args.seed + job)
            self.executor = ProcessPoolExecutor(self.args.jobs, context, _start_job,
                                                (self.args, seeds, os.getpid()))
        # Small shares handed out as jobs come free: one slow schema holds up one job,
        # not a sixteenth of the subset.
        futures = [self.executor.submit(_run_share, cases[i:i + SHARE])
                   for i in range(0, len(cases), SHARE)]
        yield from (future.result() for future in as_completed(futures))

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)
        if self.job is not None:
            self.job.backend.destroy()


def main(argv: list[str] | None = None) -> int:
    options = parser(__doc__.splitlines()[0])
    options.add_argument("--walks", type=int, default=20, help="ended walks per schema and tier")
    options.add_argument("--cache-dir", help="index cache kept between runs (default: fresh)")
    options.add_argument("--seed", type=int, default=0)
    options.add_argument("--jobs", type=int, default=1,
                         help="processes side by side, each with --workers compile workers")
    options.add_argument("--part", default="1/1",
                         help="K/N: only the K-th of N slices of each subset (runs split up)")
    options.add_argument("--records", help="JSON lines of results: appended to, and the "
                         "schemas it has are not run again")
    options.add_argument("--rerun", action="store_true",
                         help="run recorded schemas again where a tier ended too few walks or "
                         "DotLLM now serves the schema differently")
    options.add_argument("--verbose", action="store_true", help="list every failure")
    options.add_argument("--no-xgrammar", action="store_true",
                         help="do not count what stock vLLM's xgrammar compiles")
    args = options.parse_args(argv)
    part, parts = map(int, args.part.split("/"))
    recorded = _recorded(args.records)
    shares = _Shares(args)
    try:
        for subset in args.subsets:
            started = time.monotonic()
            cases = load(subset, sample=args.sample or None)[part - 1::parts]
            if args.rerun:
                for case in cases:
                    if (subset, case.id) in recorded and not _stands(
                            recorded[subset, case.id], case, args.walks):
                        del recorded[subset, case.id]
            records = [recorded[subset, c.id] for c in cases if (subset, c.id) in recorded]
            todo = [c for c in cases if (subset, c.id) not in recorded]
            for done in shares.run(todo):
                records += done
                if args.records:
                    with open(args.records, "a") as f:
                        f.writelines(json.dumps(r) + "\n" for r in done)
                print(f"{subset}: {len(records)}/{len(cases)} schemas", file=sys.stderr,
                      flush=True)
            _print_report(subset, records, args, time.monotonic() - started)
    finally:
        shares.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
