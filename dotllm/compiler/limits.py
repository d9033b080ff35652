"""Bounds on what one request may ask for, so that no client can make the server spend
unbounded time or memory on its constraint.

A 2 MB schema of 20,000 optional properties drove a compile worker to 13.5 GB; arrays
nested 500 deep overflowed Python's recursion in the API server (a 500); a 100,000-value
`enum` waited out the 60 s compile timeout for its 400. Each bound here is an option of
`dotllm serve` (`Settings`), and a request over one is a 400 that names it, answered
before any work that grows with the request: the walks here are iterative and linear.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from dotllm.compiler.errors import ConstraintError


@dataclass(frozen=True)
class Limits:
    schema_kib: int = 1024  # --dotllm-max-schema-kib: a JSON schema's (or grammar's) text
    depth: int = 100  # --dotllm-max-schema-depth: nesting of JSON objects and arrays
    choices: int = 10_000  # --dotllm-max-choices: a `choice` list, or any `enum` list
    regex_chars: int = 65_536  # --dotllm-max-regex-chars

    def check_text(self, text: str, what: str) -> None:
        if len(text) > self.schema_kib * 1024:  # characters: a cheap upper bound's proxy
            raise ConstraintError(
                f"{what} is {len(text) / 1024:,.0f} KiB, over the limit of "
                f"{self.schema_kib:,} KiB (--dotllm-max-schema-kib)", "limit")

    def check_regex(self, pattern: str) -> None:
        if len(pattern) > self.regex_chars:
            raise ConstraintError(f"regex is {len(pattern):,} characters long, over the limit "
                                  f"of {self.regex_chars:,} (--dotllm-max-regex-chars)", "limit")

    def check_choices(self, count: int, where: str) -> None:
        if count > self.choices:
            raise ConstraintError(f"{where} has {count:,} values, over the limit of "
                                  f"{self.choices:,} (--dotllm-max-choices)", "limit")

    def check_json(self, value, what: str) -> None:
        """Depth first (so nothing after it can recurse too deep), each `enum`'s length,
        then the size of the text."""
        stack = [(value, 1, "")]
        while stack:
            node, depth, pointer = stack.pop()
            if depth > self.depth:
                raise ConstraintError(
                    f"{what} nests deeper than {self.depth} levels (at {pointer or '/'}; "
                    "--dotllm-max-schema-depth)", "limit")
            if isinstance(node, dict):
                if isinstance(node.get("enum"), list):
                    self.check_choices(len(node["enum"]), f"enum at {pointer or '/'}")
                stack.extend((v, depth + 1, f"{pointer}/{k}") for k, v in node.items())
            elif isinstance(node, list):
                stack.extend((v, depth + 1, f"{pointer}/{i}") for i, v in enumerate(node))
        self.check_text(json.dumps(value, ensure_ascii=False), what)
