"""Forced drafts end to end (dotllm/vllm_ext/forced_drafts.py): `dotllm serve
--dotllm-forced-drafts 8` proposes what constraints decide as speculative drafts. The
answers are the same as without drafts (greedy: token for token; sampled: the same
distribution, all valid), in fewer engine steps; unconstrained requests get no drafts."""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter

import jsonschema
import openai
import pytest
from scipy.stats import chi2_contingency

from bench.jsonschemabench import load
from dotllm.embedded_model import NAME
from tests.conftest import check_answer, complete_constrained, start_dotllm, stop_server

pytestmark = pytest.mark.server

STEPS = "vllm:iteration_tokens_total_count"  # one observation per engine step
DRAFTED = "vllm:spec_decode_num_draft_tokens_total"
ACCEPTED = "vllm:spec_decode_num_accepted_tokens_total"
OURS = "dotllm_forced_draft_tokens_total"
FORCED = "dotllm_forced_tokens_total"
GENERATED = "vllm:generation_tokens_total"
TIER_START = "dotllm_constraint_tier_start_total"
TIERS = ("index", "llguidance")


@pytest.fixture(scope="module")
def drafting_server(embedded_model, tmp_path_factory):
    server = start_dotllm(tmp_path_factory, extra_args=("--dotllm-forced-drafts", "8"))
    yield server
    stop_server(server)


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=300)


def _settled(server, name: str, above: float, timeout_s: float = 30) -> float:
    """`name`'s total once it exceeds `above`: vLLM's API server records a step's counts
    as it hands out the step's outputs, which a client can see first."""
    deadline = time.monotonic() + timeout_s
    while (total := server.total(name)) <= above and time.monotonic() < deadline:
        time.sleep(0.2)
    return total


def _constraints() -> list[dict]:
    schemas = [c.schema for c in load("Glaiveai2K", sample=5, seed=3)]
    schemas += [c.schema for c in load("Github_trivial", sample=3, seed=3)]
    return [*({"json": s} for s in schemas),
            {"regex": r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9], ticket #[0-9]{4}"},
            {"choice": ["approved", "rejected", "needs more information"]}]


def _served(server, constraint: dict):
    """A greedy answer and the tier it started on: a compile that timed out or died of its
    memory cap on one server (a busy CI machine) leaves that constraint on llguidance
    there, which tokenizes differently from the index."""
    before = {tier: server.total(TIER_START, tier=tier) for tier in TIERS}
    choice = complete_constrained(server, constraint, 0.0)
    started = [tier for tier in TIERS if server.total(TIER_START, tier=tier) > before[tier]]
    assert len(started) == 1, started
    return choice, started[0]


def test_greedy_answers_are_token_for_token_those_without_drafts(dotllm_server,
                                                                 drafting_server):
    constraints = _constraints()
    for server in (dotllm_server, drafting_server):  # both on their indexes: warm
        for constraint in constraints:
            complete_constrained(server, constraint, 0.0)
        server.wait_for_compiles()
    before = {name: drafting_server.total(name) for name in (ACCEPTED, OURS)}
    compared = 0
    for constraint in constraints:
        plain, plain_tier = _served(dotllm_server, constraint)
        drafted, drafted_tier = _served(drafting_server, constraint)
        if plain_tier != drafted_tier:
            continue  # not the same engine: the drafts are not what differs
        compared += 1
        assert (drafted.text, drafted.finish_reason) == (plain.text, plain.finish_reason), \
            (constraint, plain_tier)
    assert compared >= len(constraints) - 1, compared
    for name in (ACCEPTED, OURS):
        assert _settled(drafting_server, name, before[name]) > before[name], name


def test_sampled_answers_with_drafts_are_valid(drafting_server):
    for i, constraint in enumerate(_constraints()):
        for seed in (1, 2):
            check_answer(constraint, complete_constrained(drafting_server, constraint, 1.0,
                                               seed=100 * i + seed))


@pytest.mark.parametrize("tier", ["llguidance", "index"])
def test_a_forced_key_takes_fewer_engine_steps_than_tokens(drafting_server, tier):
    # multipleOf keeps it on llguidance (its fast-forward drafts); on the index the drafts
    # are the tokenizer's own, its key states allowing nothing else (canonical forced
    # runs): the random model accepts them too.
    number = {"type": "integer", "minimum": 0, "maximum": 99}
    if tier == "llguidance":
        number["multipleOf"] = 1
    schema = {"type": "object", "properties": {
        "customer_identification_number": number,
        "shipping_address_confirmation": {"type": "boolean"}},
        "required": ["customer_identification_number", "shipping_address_confirmation"],
        "additionalProperties": False}
    complete_constrained(drafting_server, {"json": schema}, 0.0)
    drafting_server.wait_for_compiles()
    before = drafting_server.total(STEPS)
    generated = drafting_server.total(GENERATED)
    drafted = drafting_server.total(OURS, tier=tier)
    alone = drafting_server.total(FORCED, tier=tier)
    reply = _client(drafting_server).completions.create(
        model=NAME, prompt="Reply:", max_tokens=80, temperature=0.0,
        extra_body={"structured_outputs": {"json": schema}})
    _settled(drafting_server, GENERATED, generated + reply.usage.completion_tokens - 1)
    steps = drafting_server.total(STEPS) - before
    assert drafting_server.total(OURS, tier=tier) > drafted, tier  # that tier drafted them
    assert drafting_server.total(FORCED, tier=tier) > alone, tier  # each its state's only
    assert json.loads(reply.choices[0].text).keys() == schema["properties"].keys()
    assert steps * 2 <= reply.usage.completion_tokens, (steps, reply.usage)


def test_unconstrained_requests_get_no_drafts(drafting_server):
    before = drafting_server.total(DRAFTED)
    generated = drafting_server.total(GENERATED)
    reply = _client(drafting_server).completions.create(
        model=NAME, prompt="Tell me", max_tokens=12, temperature=0.0)
    assert reply.usage.completion_tokens == 12
    _settled(drafting_server, GENERATED, generated + 11)
    assert drafting_server.total(DRAFTED) == before


def test_sampling_keeps_the_distribution_of_answers(dotllm_server, drafting_server):
    """A forced prefix (drafted, verified by rejection sampling), then a free choice: the
    answers' distribution is the same with drafts as without (two-sample chi-square)."""
    regex = "The verdict of the committee is: (alpha|beta|gamma|delta|epsilon)"
    for server in (dotllm_server, drafting_server):
        # Both on the index: the tiers tokenize the forced prefix differently (the index
        # allows only the tokenizer's own tokens there, llguidance any), and the model's
        # choice after it depends on those tokens. A cold batch is handed over midway.
        complete_constrained(server, {"regex": regex}, 0.0)
        server.wait_for_compiles()
    counts = []
    before = {name: drafting_server.total(name) for name in (FORCED, ACCEPTED, GENERATED)}
    for server in (dotllm_server, drafting_server):
        reply = _client(server).completions.create(
            model=NAME, prompt="Verdict:", max_tokens=30, temperature=1.0, n=300, seed=7,
            extra_body={"structured_outputs": {"regex": regex}})
        texts = [c.text for c in reply.choices]
        assert all(re.fullmatch(regex, t) for t in texts)
        counts.append(Counter(t.rsplit(" ", 1)[1] for t in texts))
    words = sorted(set(counts[0]) | set(counts[1]))
    table = [[c.get(w, 0) for w in words] for c in counts]
    assert len(words) > 1, table  # a distribution to compare, not one answer
    assert chi2_contingency(table).pvalue > 1e-3, (words, table)
    # A draft its state allowed alone has probability 1 under the mask: every one is
    # accepted, sampled or not (on vLLM's CPU platform most were rejected, their
    # temperature uninitialized memory, before the cpu_spec_expand patch).
    _settled(drafting_server, GENERATED, before[GENERATED] + reply.usage.completion_tokens - 1)
    alone = drafting_server.total(FORCED) - before[FORCED]
    accepted = _settled(drafting_server, ACCEPTED, before[ACCEPTED] + alone - 1)
    assert alone > 300 and accepted - before[ACCEPTED] >= alone, (alone, accepted, before)


def test_the_users_own_speculative_method_drafts_the_rest(embedded_model, tmp_path_factory):
    """With vLLM's n-gram drafter given by the user, a constrained request's forced text
    is drafted by its constraint, free text (constrained or not) by the n-gram drafter."""
    ngram = ('{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, '
             '"prompt_lookup_min": 1}')
    # A third server beside the module's two, one request at a time: a small KV cache (CI's
    # machine once had 1.8 GiB left for the default 2).
    server = start_dotllm(tmp_path_factory, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
                          extra_args=("--speculative-config", ngram,
                                      "--dotllm-forced-drafts", "4"))
    try:
        client = _client(server)
        text = "the quick brown fox jumps over the lazy dog "
        before = {name: server.total(name) for name in (DRAFTED, OURS)}
        client.completions.create(model=NAME, prompt=text * 6, max_tokens=24, temperature=0)
        middle = {DRAFTED: _settled(server, DRAFTED, before[DRAFTED]),
                  OURS: server.total(OURS)}
        assert middle[DRAFTED] > before[DRAFTED] and middle[OURS] == before[OURS]
        schema = {"type": "object", "properties": {"story": {"type": "string",
                                                             "maxLength": 60}},
                  "required": ["story"]}
        reply = client.completions.create(
            model=NAME, prompt=text * 6, max_tokens=60, temperature=0,
            extra_body={"structured_outputs": {"json": schema}})
        assert _settled(server, OURS, middle[OURS]) > middle[OURS]
        if reply.choices[0].finish_reason == "stop":
            jsonschema.validate(json.loads(reply.choices[0].text), schema)
        assert "Loaded custom proposer" not in server.log_tail(400)  # the user's, kept
    finally:
        stop_server(server)
