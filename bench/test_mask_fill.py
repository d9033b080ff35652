"""Per-step mask cost: filling one request's bitmask row from the per-state table (DotLLM)
vs outlines-core's `Guide.write_mask_into` (what vLLM's outlines backend calls per row)
and llguidance's mask (what DotLLM's first tier and vLLM's guidance backend compute).

    pytest bench/test_mask_fill.py --benchmark-enable --benchmark-only \
        --benchmark-columns=mean,median,ops

Target (issue 3): <= 2 us a row at V = 131,072. States: the start of a JSON document
(few tokens allowed) and the inside of a free-text string (nearly all allowed).
"""

from __future__ import annotations

import numpy as np
import outlines_core
import pytest
import torch

from dotllm.compiler.compiled import CompiledIndex, outlines_index
from dotllm.compiler.mask_table import words_for
from dotllm.compiler.spec import ConstraintSpec
from dotllm.guide import Guide

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
PREFIXES = {"document_start": "", "inside_string": '{"name": "Ada Love'}


@pytest.fixture(scope="module")
def index(vocabulary):
    return outlines_index(ConstraintSpec.json_schema(SCHEMA).to_regex(), vocabulary.inner,
                          json_text=True)


@pytest.fixture(scope="module")
def compiled(index, vocabulary):
    return CompiledIndex.from_index(index, vocabulary)


def advanced(compiled, index, vocabulary, tokenizer, prefix: str):
    guide = Guide(compiled, vocabulary.eos_token_id)
    oc_guide = outlines_core.Guide(index)
    for token in tokenizer.encode(prefix, add_special_tokens=False):
        assert guide.accept_tokens([token])
        oc_guide.advance(token)
    return guide, oc_guide


@pytest.mark.parametrize("where", list(PREFIXES))
def test_fill_row_from_table(benchmark, compiled, index, vocabulary, tokenizer, where):
    guide, oc_guide = advanced(compiled, index, vocabulary, tokenizer, PREFIXES[where])
    bitmask = torch.zeros((256, words_for(vocabulary.size)), dtype=torch.int32)
    row = bitmask[17].numpy()
    benchmark.group = f"mask row, V={vocabulary.size}, {where}"
    benchmark(guide.fill_row, row)
    expected = torch.zeros(words_for(vocabulary.size), dtype=torch.int32)
    oc_guide.write_mask_into(expected.data_ptr(), expected.numel(), 4)
    expected = expected.numpy()
    assert not (row & ~expected).any()  # nothing outlines-core's index refuses
    if where == "document_start":  # `{"name":` is forced: the tokenizer's `{"` alone
        ids = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))
        assert ids.tolist() == tokenizer.encode('{"', add_special_tokens=False)
    else:
        assert np.array_equal(row, expected)


@pytest.mark.parametrize("where", list(PREFIXES))
def test_outlines_write_mask_into(benchmark, compiled, index, vocabulary, tokenizer, where):
    _, oc_guide = advanced(compiled, index, vocabulary, tokenizer, PREFIXES[where])
    row = torch.zeros(words_for(vocabulary.size), dtype=torch.int32)
    benchmark.group = f"mask row, V={vocabulary.size}, {where}"
    benchmark(oc_guide.write_mask_into, row.data_ptr(), row.numel(), 4)
    assert row.any()


def _inside_string(compiled, index, vocabulary, tokenizer):
    """Our state and outlines-core's after PREFIXES["inside_string"], and a token allowed there."""
    guide, _ = advanced(compiled, index, vocabulary, tokenizer, PREFIXES["inside_string"])
    oc_state = index.get_initial_state()
    for token in tokenizer.encode(PREFIXES["inside_string"], add_special_tokens=False):
        oc_state = index.get_next_state(oc_state, token)
    token = tokenizer.encode("lace", add_special_tokens=False)[0]
    return guide.state, oc_state, token


def test_next_state_from_table(benchmark, compiled, index, vocabulary, tokenizer):
    state, _, token = _inside_string(compiled, index, vocabulary, tokenizer)
    benchmark.group = f"accept one token, V={vocabulary.size}, inside_string"
    assert benchmark(compiled.next_state, state, token) is not None


def test_outlines_get_next_state(benchmark, compiled, index, vocabulary, tokenizer):
    _, oc_state, token = _inside_string(compiled, index, vocabulary, tokenizer)
    benchmark.group = f"accept one token, V={vocabulary.size}, inside_string"
    assert benchmark(index.get_next_state, oc_state, token) is not None


@pytest.mark.parametrize("where", list(PREFIXES))
def test_llguidance_fill_row(benchmark, vocabulary, tokenizer, where):
    import llguidance
    import llguidance.numpy

    from dotllm.compiler import llguidance_grammar
    from dotllm.vllm_ext.backend import llguidance_tokenizer

    spec = ConstraintSpec.json_schema(SCHEMA)
    matcher = llguidance.LLMatcher(llguidance_tokenizer(tokenizer, vocabulary.size),
                                   llguidance_grammar.grammar_for(spec))
    assert matcher.consume_tokens(tokenizer.encode(PREFIXES[where], add_special_tokens=False))
    row = np.zeros((1, words_for(vocabulary.size)), dtype=np.int32)
    benchmark.group = f"mask row, V={vocabulary.size}, {where}"
    benchmark(llguidance.numpy.fill_next_token_bitmask, matcher, row, 0)
    assert row.any()
