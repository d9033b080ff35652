"""JSONSchemaBench subsets (../shared/data): load schemas, and check a compiled index
against each schema's valid and invalid instances, written as the model would write them.

Used by the coverage benchmark (bench/compile_coverage.py) and by a CI-sized test.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

SUBSETS = ("Github_trivial", "Github_easy", "Glaiveai2K", "Snowplow")
# ../shared/data beside the repository; elsewhere (a GPU machine) a copy named by the variable.
DATA_DIR = Path(os.environ.get(
    "JSONSCHEMABENCH_DIR",
    Path(__file__).resolve().parents[2] / "shared" / "data" / "jsonschemabench"))


@dataclass
class Case:
    subset: str
    id: str
    schema: dict
    tests: list[dict] = field(default_factory=list)


def load(subset: str, sample: int | None = None, seed: int = 0,
         data_dir: Path = DATA_DIR) -> list[Case]:
    with gzip.open(data_dir / f"{subset}.jsonl.gz", "rt") as f:
        cases = [Case(subset, row["id"], row["schema"], row.get("tests", [])) for row in map(
            json.loads, f)]
    if sample is not None and sample < len(cases):
        cases = random.Random(seed).sample(cases, sample)
    return cases


def _resolve(schema, root):
    """Follow local `$ref`s (`#/...`)."""
    seen = 0
    while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and seen < 32:
        ref = schema["$ref"]
        if not ref.startswith("#"):
            return schema
        target = root
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                return schema
            target = target[part]
        schema, seen = target, seen + 1
    return schema


def _branch_for(value: dict, schema: dict, root) -> dict:
    """The subschema whose `properties` describe `value` (through anyOf/oneOf/allOf)."""
    for keyword in ("anyOf", "oneOf", "allOf"):
        for branch in schema.get(keyword) or []:
            branch = _resolve(branch, root)
            if isinstance(branch, dict) and set(value) <= set(branch.get("properties") or {}):
                return _branch_for(value, branch, root)
    return schema


def in_schema_order(value, schema, root=None):
    """`value` with object keys in the order of the schema's `properties`, as generated."""
    root = schema if root is None else root
    schema = _resolve(schema, root)
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict):
        props = _branch_for(value, schema, root).get("properties") or {}
        ordered = {k: value[k] for k in props if k in value}
        ordered.update((k, v) for k, v in value.items() if k not in ordered)
        return {k: in_schema_order(v, props.get(k, {}), root) for k, v in ordered.items()}
    if isinstance(value, list):
        items = schema.get("items")
        return [in_schema_order(v, items if isinstance(items, dict) else {}, root)
                for v in value]
    return value


def accepts(guide_factory, tokenizer, text: str) -> bool:
    """Does a fresh guide accept `text` (as the tokenizer encodes it) followed by EOS?"""
    guide = guide_factory()
    ids = tokenizer.encode(text, add_special_tokens=False)
    return guide.accept_tokens(ids) and guide.accept_tokens([tokenizer.eos_token_id])


def parser(description: str) -> argparse.ArgumentParser:
    """The options every JSONSchemaBench benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--sample", type=int, default=30, help="schemas per subset (0: all)")
    p.add_argument("--timeout", type=float, default=20.0, help="compile timeout, seconds")
    p.add_argument("--workers", type=int, default=2, help="compile pool workers")
    p.add_argument("--subsets", nargs="*", default=list(SUBSETS))
    return p


def embedded_tokenizer_and_vocabulary():
    """The embedded model's tokenizer (built if needed) and its compile vocabulary."""
    from transformers import AutoTokenizer

    from dotllm import embedded_model
    from dotllm.compiler.vocabulary import Vocabulary

    tokenizer = AutoTokenizer.from_pretrained(embedded_model.build())
    return tokenizer, Vocabulary.from_tokenizer(tokenizer)
