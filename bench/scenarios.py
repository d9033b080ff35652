"""What the serving benchmark sends: per scenario, the requests of one batch and how to
tell a valid answer.

Equal work (`free`, `enum-array`, `long-string`, `mix-20`, `mix-80`): every request runs
exactly `tokens` decode steps on every engine, so step times and tokens/s compare the same
work; their ratio to `free` is the cost of the constraint. Documents (`schema`,
`schema-compact`, `regex`, `choice`): each request runs until its answer is complete (or
`max_tokens`), the figure is the time to a complete, valid answer. `schema-mix` (a batch
of real schemas, warm) runs until each answer is complete, then its twin `schema-mix-free`
runs free requests of exactly the same lengths: the step's cost on real schemas, at equal
work. `unique` (real schemas from ../shared/data, each once cold then once warm) is driven
by bench.serve itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import cycle, islice

import jsonschema

EQUAL_WORK = ("free", "enum-array", "long-string", "mix-20", "mix-80")
DOCUMENTS = ("schema", "schema-compact", "regex", "choice")
SCHEMA_MIX, MATCHED_FREE = "schema-mix", "schema-mix-free"
SCENARIOS = (*EQUAL_WORK, *DOCUMENTS, SCHEMA_MIX, "unique")
# Whose step time each is set against: the same server's, same repeat's.
STEP_COMPARED = (*EQUAL_WORK, SCHEMA_MIX, MATCHED_FREE)
BASELINES = ("free", MATCHED_FREE)

ENUM_ITEMS = ["alpha", "beta", "gamma", "delta"]
# A realistic response schema: bounded strings and arrays, so every engine's answer ends.
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999999},
        "customer": {"type": "string", "minLength": 1, "maxLength": 24},
        "status": {"enum": ["pending", "paid", "shipped", "cancelled"]},
        "express": {"type": "boolean"},
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                           "quantity": {"type": "integer", "minimum": 1, "maximum": 99}},
            "required": ["sku", "quantity"], "additionalProperties": False}},
    },
    "required": ["id", "customer", "status", "express", "items"],
    "additionalProperties": False,
}
DATE_TIME = r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]"
CHOICES = ["positive", "negative", "neutral", "mixed", "unrelated", "unsure"]


@dataclass(frozen=True)
class Request:
    body: dict  # fields added to the completion request
    check: Callable[[str], bool] | None = None  # a complete answer's validity
    constrained: bool = True
    steps: int | None = None  # exactly this many (None: until complete, or max_tokens)


def baseline(scenario: str) -> str:
    """The scenario a step-compared scenario's steps are set against."""
    return MATCHED_FREE if scenario in (SCHEMA_MIX, MATCHED_FREE) else "free"


def schema_check(schema: dict) -> Callable[[str], bool]:
    validator = jsonschema.validators.validator_for(schema)(schema)

    def check(text: str) -> bool:
        try:
            return validator.is_valid(json.loads(text))
        except ValueError:
            return False
    return check


def _equal(workload: str, tokens: int) -> Request:
    """A request that runs exactly `tokens` steps."""
    if workload == "free":
        return Request({"ignore_eos": True}, constrained=False, steps=tokens)
    if workload == "enum-array":
        schema = {"type": "array", "items": {"enum": ENUM_ITEMS}, "minItems": tokens}
    else:  # long-string: no token of the vocabulary is 64 characters long
        schema = {"type": "object", "required": ["text"], "properties": {
            "text": {"type": "string", "minLength": 64 * tokens}}}
    return Request({"structured_outputs": {"json": schema}, "min_tokens": tokens},
                   steps=tokens)


def schema_mix(schemas: list[dict], concurrency: int) -> list[Request]:
    """`concurrency` requests over `schemas` in turn, each until its answer is complete."""
    return [Request({"structured_outputs": {"json": schema}}, schema_check(schema))
            for schema in islice(cycle(schemas), concurrency)]


def matched_free(tokens: list[int], status: list[str]) -> list[Request]:
    """Free requests as long as a schema mix's served answers (a batch's tokens and
    status): its equal work."""
    return [Request({"ignore_eos": True}, constrained=False, steps=n)
            for n, ok in zip(tokens, status, strict=True) if ok == "ok" and n]


def batch(scenario: str, concurrency: int, tokens: int) -> list[Request]:
    """The `concurrency` requests of one batch of `scenario` (not `unique` nor the schema
    mix's, which need data)."""
    if scenario.startswith("mix-"):  # a share of the batch constrained, the rest free
        constrained = round(concurrency * int(scenario[4:]) / 100)
        return [_equal("enum-array" if i < constrained else "free", tokens)
                for i in range(concurrency)]
    if scenario in ("free", "enum-array", "long-string"):
        return [_equal(scenario, tokens)] * concurrency
    if scenario in ("schema", "schema-compact"):
        outputs = {"json": ORDER, "disable_any_whitespace": scenario == "schema-compact"}
        request = Request({"structured_outputs": outputs}, schema_check(ORDER))
    elif scenario == "regex":
        request = Request({"structured_outputs": {"regex": DATE_TIME}},
                          lambda text: re.fullmatch(DATE_TIME, text) is not None)
    elif scenario == "choice":
        request = Request({"structured_outputs": {"choice": CHOICES}},
                          lambda text: text in CHOICES)
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    return [request] * concurrency
