"""Where the two tiers' masks differ: a document walked through a schema's index and its
llguidance grammar together, token by token, the tokens each allows that the other does
not printed at every step where they differ.

    python -m bench.tier_masks [--schema FILE.json] [--document TEXT]

(the embedded model's tokenizer; by default an object with an integer, a string and an
array of strings). Greedy answers differ between the tiers where these sets do, and so do
forced drafts (issue 16).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import llguidance
import numpy as np

from dotllm import embedded_model
from dotllm.compiler import llguidance_grammar
from dotllm.compiler.compiled import CompiledIndex
from dotllm.compiler.spec import ConstraintSpec
from dotllm.compiler.vocabulary import Vocabulary
from dotllm.guide import Guide
from dotllm.llguidance_guide import LLGuidanceGuide

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["id", "title"],
          "properties": {"id": {"type": "integer"}, "title": {"type": "string"},
                         "tags": {"type": "array", "items": {"type": "string"}}}}
DOCUMENT = '{"id": 7777, "title": "ab c", "tags": ["x"]}'


def allowed(row: np.ndarray) -> set[int]:
    return set(np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")).tolist())


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from dotllm.vllm_ext.backend import llguidance_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schema", help="a JSON schema file (default: a small object)")
    parser.add_argument("--document", default=DOCUMENT, help="a valid instance, as written")
    args = parser.parse_args(argv)
    schema = json.loads(Path(args.schema).read_text()) if args.schema else SCHEMA
    tokenizer = AutoTokenizer.from_pretrained(embedded_model.build())
    vocabulary = Vocabulary.from_tokenizer(tokenizer)
    spec = ConstraintSpec.json_schema(schema)
    compiled = CompiledIndex.for_spec(spec, vocabulary)
    index = Guide(compiled, vocabulary.eos_token_id)
    matcher = llguidance.LLMatcher(llguidance_tokenizer(tokenizer, vocabulary.size),
                                   llguidance_grammar.grammar_for(spec))
    ll = LLGuidanceGuide(matcher, vocabulary.eos_token_id)
    row = np.zeros(compiled.table.rows.shape[1], dtype=np.int32)
    name = lambda ids: [tokenizer.decode([i]) for i in sorted(ids)[:12]]  # noqa: E731
    tokens = tokenizer.encode(args.document, add_special_tokens=False)
    for token in [*tokens, vocabulary.eos_token_id]:
        ll.fill_row(row)
        on_ll, on_index = allowed(row), allowed(compiled.mask_row(index.state))
        if on_ll != on_index:
            print(f"before {tokenizer.decode([token])!r}: index only {len(on_index - on_ll)} "
                  f"{name(on_index - on_ll)}; llguidance only {len(on_ll - on_index)} "
                  f"{name(on_ll - on_index)}")
        if not (index.accept_tokens([token]) and ll.accept_tokens([token])):
            print(f"{tokenizer.decode([token])!r} refused: index {index.num_accepted}, "
                  f"llguidance {ll.is_terminated()}")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
