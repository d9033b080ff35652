"""How much of a JSON document its schema decides (issue 16): the share of tokens the
index's forced drafts would supply, and the forward passes per token that leaves.

    python -m bench.forced_share [--sample 30] [--subsets Glaiveai2K Github_easy]
                                 [--drafts 4 8 16]

Each schema's valid instances (../shared/data), written as the model writes them (keys in
schema order, json.dumps's layout) and tokenized by the embedded model's tokenizer (Tekken)
as a whole, are walked through the schema's compiled index as speculative decoding would
run them: at each step the state's forced drafts (at most --drafts) are checked against
the document's next tokens, the matching ones are accepted, and the model adds one token
(the bonus token of verification). `forced` is the share of the document's tokens (EOS
included) that came from accepted drafts; `passes/token` the forward passes per token (1.0
without drafts); `bytes forced` the share of the document's bytes inside a state's forced
text, whatever the tokenization; `allowed alone` the share of its tokens whose state allows
no other token (what jump-forward could append unverified without changing the output);
and how many drafted states spell their forced text as the tokenizer encodes it alone.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.compile_coverage import run
from bench.jsonschemabench import embedded_tokenizer_and_vocabulary, in_schema_order, load, parser


@dataclass
class Walks:
    caps: list[int]  # draft caps to walk with
    tokens: int = 0
    bytes: int = 0
    bytes_forced: int = 0
    documents: int = 0
    refused: int = 0  # instances the index does not accept as tokenized (not walked)
    alone: int = 0  # tokens from states that allow no other (appendable unverified)
    accepted: dict[int, int] = field(default_factory=dict)  # draft cap -> accepted drafts
    passes: dict[int, int] = field(default_factory=dict)  # draft cap -> forward passes
    per_schema: list[float] = field(default_factory=list)  # forced share, the largest cap
    spelled: int = 0  # drafted states whose forced text is whole UTF-8
    spelled_alike: int = 0  # ... and whose drafts are the tokenizer's own tokens of it

    def look(self, outcome, compiled, tokenizer, vocabulary) -> None:
        """Walks each valid instance of a compiled schema."""
        eos, cap = vocabulary.eos_token_id, self.caps[-1]
        tokens, accepted = self.tokens, self.accepted.get(cap, 0)
        for state in range(compiled.num_states):
            drafts = [d for d in compiled.forced_tokens(state).tolist() if d != eos]
            try:
                text = b"".join(vocabulary.token_bytes[d] for d in drafts).decode()
            except UnicodeDecodeError:
                continue
            if drafts:
                self.spelled += 1
                self.spelled_alike += tokenizer.encode(text, add_special_tokens=False) == drafts
        for test in outcome.case.tests:
            if not test["valid"]:
                continue
            text = json.dumps(in_schema_order(test["data"], outcome.case.schema),
                              ensure_ascii=False)
            ids = [*tokenizer.encode(text, add_special_tokens=False), eos]
            results = {k: walk(compiled, ids, eos, k) for k in self.caps}
            if any(r is None for r in results.values()):
                self.refused += 1
                continue
            self.documents += 1
            self.tokens += len(ids)
            self.bytes += len(text.encode())
            self.bytes_forced += forced_bytes(compiled, ids, vocabulary)
            self.alone += allowed_alone(compiled, ids)
            for k, (n, passes) in results.items():
                self.accepted[k] = self.accepted.get(k, 0) + n
                self.passes[k] = self.passes.get(k, 0) + passes
        if self.tokens > tokens:
            self.per_schema.append((self.accepted[cap] - accepted) / (self.tokens - tokens))


def walk(compiled, ids: list[int], eos: int, cap: int) -> tuple[int, int] | None:
    """(accepted drafts, forward passes) for the document `ids` (EOS last), or None if the
    index refuses it."""
    state, i, accepted, passes = compiled.initial_state, 0, 0, 0
    while i < len(ids):
        drafts = compiled.forced_tokens(state)[:cap].tolist()
        m = 0
        while m < len(drafts) and i + m < len(ids) and drafts[m] == ids[i + m]:
            m += 1
        produced = ids[i:i + m + 1]  # the accepted drafts, then the model's own token
        for token in produced:
            if token == eos:
                return (accepted + m, passes + 1) if compiled.is_final(state) else None
            if (state := compiled.next_state(state, token)) is None:
                return None
        accepted, passes, i = accepted + m, passes + 1, i + len(produced)
    return None  # no EOS: not a complete document


def allowed_alone(compiled, ids: list[int]) -> int:
    """Tokens of the document (EOS last) that their state allows alone: what jump-forward
    could append with no forward pass and no change to the output distribution."""
    state, out = compiled.initial_state, 0
    for token in ids:
        out += len(compiled.transitions.tokens_from(state)) == 1
        state = compiled.next_state(state, token)
        if state is None:
            break
    return out


def forced_bytes(compiled, ids: list[int], vocabulary) -> int:
    """Bytes of the document inside the forced text of the state before them."""
    state, out, skip = compiled.initial_state, 0, 0
    spelled = vocabulary.token_bytes
    for token in ids:
        if token == vocabulary.eos_token_id:
            break
        text = b"".join(spelled.get(d, b"") for d in compiled.forced_tokens(state).tolist())
        skip = max(skip, len(text))
        b = spelled.get(token, b"")
        out += min(len(b), skip)
        skip = max(0, skip - len(b))
        state = compiled.next_state(state, token)
    return out


def main(argv: list[str] | None = None) -> int:
    options = parser(__doc__.splitlines()[0])
    options.add_argument("--drafts", nargs="+", type=int, default=[4, 8, 16])
    options.set_defaults(subsets=["Glaiveai2K", "Github_easy"])
    args = options.parse_args(argv)
    tokenizer, vocabulary = embedded_tokenizer_and_vocabulary()
    lines = ["| subset | schemas compiled | documents | tokens | bytes forced | allowed alone | "
             + " | ".join(f"forced, {k} drafts | passes/token, {k}" for k in args.drafts) + " |",
             "|---|---|---|---|---|---|" + "---|---|" * len(args.drafts)]
    for subset in args.subsets:
        walks = Walks(args.drafts)
        cases = load(subset, sample=args.sample or None)
        with tempfile.TemporaryDirectory() as tmp:
            outcomes = run(cases, tokenizer, vocabulary, args.workers, args.timeout, Path(tmp),
                           on_compiled=walks.look)
        compiled = sum(o.status == "compiled" for o in outcomes)
        t = max(1, walks.tokens)
        lines.append(
            f"| {subset} | {compiled}/{len(cases)} | {walks.documents} (+{walks.refused} "
            f"refused) | {walks.tokens:,} | {walks.bytes_forced / max(1, walks.bytes):.1%} | "
            f"{walks.alone / t:.1%} | "
            + " | ".join(f"{walks.accepted.get(k, 0) / t:.1%} | {walks.passes.get(k, 0) / t:.3f}"
                         for k in args.drafts)
            + f" |  (per schema, {args.drafts[-1]} drafts: median "
            f"{statistics.median(walks.per_schema) if walks.per_schema else float('nan'):.1%}; "
            f"drafts spelled as the tokenizer does: {walks.spelled_alike}/{walks.spelled} "
            "drafted states)")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
