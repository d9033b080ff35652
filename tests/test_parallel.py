"""`dotllm serve` split over several model workers (issue 17): with tensor parallelism each
rank masks its own logits with DotLLM's kernel from its own mask tables; with pipeline
parallelism the last stage does. JSON-schema, regex and choice requests, cold (llguidance
while the index compiles) and warm (the index), give valid answers either way.

On CPU (CI) vLLM runs the two workers as processes on the CPU. Where two GPUs are present
the same checks run on them (bench/gpu_parallel.sh); elsewhere that test is skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re

import jsonschema
import openai
import pytest
import torch

from dotllm.embedded_model import NAME
from tests.conftest import cpu_shm_communicator, free_port, start_dotllm, stop_server

pytestmark = pytest.mark.server

SPLITS = [("--tensor-parallel-size", "2"), ("--pipeline-parallel-size", "2")]
LOG_LINE = "DotLLM applies grammar bitmasks with its {kernel} kernel"


def _tier_tokens(server) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in server.metrics().items():
        if key.startswith("dotllm_constraint_tier_tokens_total{"):
            tier = key.split('tier="', 1)[1].split('"', 1)[0]
            out[tier] = out.get(tier, 0) + value
    return out


def serve_split(split: tuple[str, str], kernel: str, tmp_path_factory, env=None) -> str:
    """Serve and check every kind of constraint; returns the server's log, once stopped."""
    server = start_dotllm(tmp_path_factory, env=env, extra_args=split)
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0,
                               timeout=600)
        schema = {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 12},
            "size": {"enum": ["small", "medium", "large"]},
            "count": {"type": "number", "minimum": 0, "maximum": 999}},  # llguidance
            "required": ["name", "size", "count"], "additionalProperties": False}
        regex = r"[A-Z]{2}-[0-9]{4}"
        choices = ["north", "south", "east", "west"]
        for phase in ("cold", "warm"):
            rows = server.total("dotllm_mask_rows_total")
            reply = client.completions.create(
                model=NAME, prompt=f"{phase}:", max_tokens=80, seed=1,
                extra_body={"structured_outputs": {"json": schema}})
            if reply.choices[0].finish_reason == "stop":
                jsonschema.validate(json.loads(reply.choices[0].text), schema)
            reply = client.completions.create(
                model=NAME, prompt=f"{phase}:", max_tokens=20,
                extra_body={"structured_outputs": {"regex": regex}})
            assert re.fullmatch(regex, reply.choices[0].text)
            reply = client.completions.create(
                model=NAME, prompt=f"{phase}:", max_tokens=20,
                extra_body={"structured_outputs": {"choice": choices}})
            assert reply.choices[0].text in choices
            free = client.completions.create(model=NAME, prompt="free", max_tokens=8)
            assert free.usage.completion_tokens == 8
            assert server.total("dotllm_mask_rows_total") > rows, phase
            server.wait_for_compiles()
        tiers = _tier_tokens(server)
        assert tiers.get("llguidance", 0) > 0 and tiers.get("index", 0) > 0, tiers
        # Once a worker process; the workers' lines can interleave in the shared log (a
        # prefix written, then another worker's line): the message itself is counted.
        masking = server.log.read_text().count(LOG_LINE.format(kernel=kernel))
        expected = 2 if split[0] == "--tensor-parallel-size" else 1  # the last stage samples
        assert masking >= expected, server.log_tail(200)
    finally:
        stop_server(server)
    return server.log.read_text(errors="replace")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU workers: on a GPU machine "
                    "`dotllm serve` uses the GPUs (test_two_gpus)")
@pytest.mark.parametrize("split", SPLITS, ids=lambda s: s[0].strip("-"))
def test_two_cpu_workers(split, embedded_model, tmp_path_factory):
    # (one NUMA node here: `dotllm serve` has vLLM split the CPUs between the workers)
    # The workers' shared-memory segments are named after their store's port, which
    # VLLM_PORT makes the first free one from `base`. A dead server's segments under those
    # names (vLLM leaves them: the cpu_shm patch) must not stop this one, nor may it
    # leave any. (Where this CPU's kernels have no such communicator, none is made.)
    base, group = free_port(), "tp:0" if split[0] == "--tensor-parallel-size" else "pp:0"
    shm = cpu_shm_communicator()
    planted = [f"/dev/shm/{port}-{group}-[0-1]-cpushm_{rank}"
               for port in range(base, base + 4) for rank in (0, 1)] if shm else []
    for path in planted:
        with open(path, "wb") as f:
            f.write(b"\x07" * 4096)
    env = {**os.environ, "VLLM_PORT": str(base)}
    try:
        log = serve_split(split, "torch", tmp_path_factory, env=env)
        port = int(re.search(r"distributed_init_method=tcp://[0-9.]+:([0-9]+)", log)[1])
        assert base <= port < base + 4, (base, port)  # it met a dead server's segments
        assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"{port}-")]
    finally:
        for path in planted:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("split", SPLITS, ids=lambda s: s[0].strip("-"))
def test_two_gpus(split, embedded_model, tmp_path_factory):
    serve_split(split, "cuda", tmp_path_factory, env={**os.environ,
                                                       "VLLM_USE_FLASHINFER_SAMPLER": "0"})
