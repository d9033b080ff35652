"""Integers between bounds as a regex (dotllm.compiler.integer_range), checked number by
number against the bounds themselves."""

from __future__ import annotations

import random
import re

import pytest

from dotllm.compiler.integer_range import integer_regex, marker, substitute

BOUNDS = [None, -1000, -101, -100, -99, -10, -9, -1, 0, 1, 5, 9, 10, 11, 19, 20, 99, 100,
          101, 123, 999, 1000, 1234]
JSON_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")


def _wanted(text: str, low: int | None, high: int | None) -> bool:
    if not JSON_INTEGER.fullmatch(text) or text == "-0":
        return False
    n = int(text)
    return (low is None or n >= low) and (high is None or n <= high)


@pytest.mark.parametrize("low", BOUNDS)
def test_every_integer_in_a_window_and_nothing_else(low):
    texts = [str(n) for n in range(-1300, 1300)] + [
        "-0", "00", "01", "-01", "007", "", "-", "+1", "1.0", "1e2", str(10 ** 7),
        str(-10 ** 7)]
    for high in BOUNDS:
        if low is not None and high is not None and low > high:
            continue
        regex = re.compile(integer_regex(low, high))
        for text in texts:
            assert (regex.fullmatch(text) is not None) == _wanted(text, low, high), (
                low, high, text)


def test_wide_random_ranges_at_their_edges():
    rng = random.Random(3)
    for _ in range(200):
        low = rng.randint(-10 ** 9, 10 ** 9)
        high = low + rng.randint(0, 10 ** 9)
        regex = re.compile(integer_regex(low, high))
        for n in [low, high, low - 1, high + 1,
                  *(rng.randint(low - 10 ** 8, high + 10 ** 8) for _ in range(40))]:
            assert (regex.fullmatch(str(n)) is not None) == (low <= n <= high), (low, high, n)


def test_an_empty_range_is_an_error():
    with pytest.raises(ValueError):
        integer_regex(3, 2)


def test_a_quoted_marker_becomes_its_range():
    text = f'{{"a":("{marker(-5, 12)}"),"b":("{marker(None, 0)}")}}'
    out = substitute(text)
    assert "dotllm_integer_" not in out
    a, b = re.findall(r"\(\(\?:(.*?)\)\)", out)
    assert re.fullmatch(a, "-5") and re.fullmatch(a, "12") and not re.fullmatch(a, "13")
    assert re.fullmatch(b, "-40") and not re.fullmatch(b, "1")
