"""Integers between bounds as a regex, and their way through outlines-core.

outlines-core 0.2.14 writes every integer as `(-)?(0|[1-9][0-9]*)` and ignores `minimum`
and `maximum`. A bounded integer is handed to it as a string whose pattern is a marker
naming the bounds (`marker`); `substitute` then replaces the quoted marker in the regex
outlines-core built with the range's own regex. A schema whose text already holds a
marker's prefix is not rewritten this way (`MARKER_PREFIX`), so only DotLLM's markers are
ever replaced.
"""

from __future__ import annotations

import re

MARKER_PREFIX = "dotllm_integer_"
_MARKER = re.compile(f'"{MARKER_PREFIX}' + r'(m?\d+|x)_(m?\d+|x)"')
MAX_DIGITS = 18  # bounds past this many digits: llguidance serves the schema


def _number(text: str) -> int | None:
    if text == "x":
        return None
    return -int(text[1:]) if text.startswith("m") else int(text)


def _text(value: int | None) -> str:
    if value is None:
        return "x"
    return f"m{-value}" if value < 0 else str(value)


def marker(low: int | None, high: int | None) -> str:
    """The pattern standing for integers in [low, high] (None: unbounded)."""
    return f"{MARKER_PREFIX}{_text(low)}_{_text(high)}"


def substitute(regex: str) -> str:
    """`regex` with every quoted marker replaced by its integers' regex."""
    return _MARKER.sub(
        lambda m: f"(?:{integer_regex(_number(m.group(1)), _number(m.group(2)))})", regex)


def integer_regex(low: int | None, high: int | None) -> str:
    """JSON integers n with low <= n <= high (None: unbounded), without leading zeros
    and without `-0` (which llguidance does not write either: the tiers agree)."""
    if low is not None and high is not None and low > high:
        raise ValueError(f"empty range [{low}, {high}]")
    parts = []
    if high is None or high >= 0:
        parts += _natural(max(low or 0, 0), high)
    if low is None or low < 0:  # -n for n in [max(1, -high), -low]
        least = 1 if high is None or high >= 0 else -high
        parts += ["-" + p for p in _natural(least, None if low is None else -low)]
    return "|".join(parts)


def _natural(low: int, high: int | None) -> list[str]:
    """Alternatives for low <= n <= high, n >= 0 written without leading zeros."""
    if high is None:
        digits = len(str(low))
        return [*_natural(low, 10 ** digits - 1), f"[1-9][0-9]{{{digits},}}"]
    parts = []
    while low <= high:
        top = min(high, 10 ** len(str(low)) - 1)
        parts += _same_width(str(low), str(top))
        low = top + 1
    return parts


def _same_width(low: str, high: str) -> list[str]:
    """Alternatives for the digit strings of one width from `low` to `high`."""
    if low == high:
        return [low]
    width = len(low)
    if width == 1:
        return [f"[{low}-{high}]"]
    rest = width - 1
    if low[1:] == "0" * rest and high[1:] == "9" * rest:
        head = low[0] if low[0] == high[0] else f"[{low[0]}-{high[0]}]"
        return [f"{head}[0-9]{{{rest}}}"]
    if low[0] == high[0]:
        return [low[0] + _group(_same_width(low[1:], high[1:]))]
    parts = [low[0] + _group(_same_width(low[1:], "9" * rest))]
    if int(high[0]) - int(low[0]) > 1:
        parts.append(f"[{int(low[0]) + 1}-{int(high[0]) - 1}][0-9]{{{rest}}}")
    parts.append(high[0] + _group(_same_width("0" * rest, high[1:])))
    return parts


def _group(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else f"(?:{'|'.join(parts)})"
