"""Benchmarks: `pytest bench --benchmark-enable --benchmark-only` times them; the test
suite runs each once, untimed, so that they keep working."""

from tests.conftest import backend, embedded_model, tokenizer, vocabulary  # noqa: F401  (fixtures)
