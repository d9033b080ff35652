"""The `vllm.general_plugins` entry point: active under `dotllm`, idle under plain vLLM."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
import torch

from dotllm.vllm_ext import plugin

# Loads plugins exactly as vLLM does in each of its processes, then reports what changed.
PROBE = """
import json, multiprocessing, os, sys
from vllm.plugins import load_general_plugins
if os.environ.get("PROBE_AS_LAUNCHER") and "DOTLLM_SERVE" not in os.environ:
    os.environ["DOTLLM_SERVE"] = str(os.getpid())
# Spawned children re-import this module before they know they are children.
load_general_plugins()

CPU_COMMUNICATOR = "vllm.distributed.device_communicators.cpu_communicator"
REJECTION_SAMPLER = "vllm.v1.sample.rejection_sampler"

def report():
    from vllm.config.scheduler import SchedulerConfig
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.sched import scheduler
    from vllm.v1.structured_output import StructuredOutputManager
    from vllm.v1.structured_output.request import StructuredOutputRequest

    api = sys.modules.get("vllm.entrypoints.openai.api_server")
    chat = sys.modules.get("vllm.entrypoints.openai.chat_completion.protocol")
    async_llm = sys.modules.get("vllm.v1.engine.async_llm")
    v1_runner = sys.modules.get("vllm.v1.worker.gpu_model_runner")
    v2_outputs = sys.modules.get("vllm.v1.worker.gpu.structured_outputs")
    targets = [getattr(api, "build_app", None),
               SamplingParams._validate_structured_outputs,
               getattr(getattr(chat, "ChatCompletionRequest", None),
                       "extract_structured_outputs", None),
               StructuredOutputManager.__init__,
               StructuredOutputManager.grammar_bitmask,
               SchedulerConfig.get_scheduler_cls,
               scheduler.Scheduler.update_from_output,
               getattr(getattr(async_llm, "AsyncLLM", None), "generate", None),
               getattr(v1_runner, "apply_grammar_bitmask", None),
               getattr(getattr(v2_outputs, "StructuredOutputsWorker", None),
                       "apply_grammar_bitmask", None),
               scheduler.Scheduler.update_draft_token_ids,
               StructuredOutputRequest._check_grammar_completion,
               getattr(getattr(sys.modules.get(CPU_COMMUNICATOR), "_CPUSHMDistributed", None),
                       "_init_cpu_shm", None),
               getattr(sys.modules.get(REJECTION_SAMPLER), "expand_batch_to_tokens", None)]
    from dotllm.vllm_ext.patching import patches_on
    return {"api_server_loaded": api is not None,
            "patched": [",".join(patches_on(t)) or None for t in targets]}

def child(queue):
    load_general_plugins()
    queue.put(report())

if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=child, args=(queue,))
    p.start()
    out = {"main": report(), "child": queue.get(timeout=120)}
    p.join()
    print(json.dumps(out))
"""


def probe(active: bool, tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != plugin.ACTIVE_ENV}
    if active:
        env["PROBE_AS_LAUNCHER"] = "1"
        env["DOTLLM_FORCED_DRAFTS"] = "8"  # (off by default)
    script = tmp_path / "probe.py"  # spawn re-imports the main module: it must be a file
    script.write_text(PROBE)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_entry_point_is_registered():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert [ep.value for ep in eps if ep.name == "dotllm"] == ["dotllm.vllm_ext.plugin:register"]


def test_plain_vllm_process_stays_stock(tmp_path):
    out = probe(active=False, tmp_path=tmp_path)
    assert out["main"] == {"api_server_loaded": False, "patched": [None] * 14}
    assert out["child"] == {"api_server_loaded": False, "patched": [None] * 14}


def test_dotllm_patches_each_process_for_its_role(tmp_path):
    out = probe(active=True, tmp_path=tmp_path)
    assert out["main"] == {
        "api_server_loaded": True,
        "patched": ["server_identity", "request_validation",
                    "unenforced_report,legacy_fields", "engine_backend", None, None,
                    "compile_errors", "compile_errors", None, None, None, None, None, None],
    }
    # Engine-core and worker processes are children: no API-server code is pulled in, and
    # the model runners' bitmask application is DotLLM's.
    assert out["child"] == {
        "api_server_loaded": False,
        "patched": [None, "request_validation", None, "engine_backend", "row_plans",
                    "compile_overlap", "compile_errors", None, "mask_kernels",
                    "mask_kernels", "forced_drafts", "ready_grammar",
                    *([None, None] if torch.cuda.is_available()  # CPU workers only
                      else ["cpu_shm", "cpu_spec_expand"])],
    }


def test_register_is_idempotent(monkeypatch):
    import vllm.entrypoints.openai.api_server as api_server
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.sched import scheduler
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.structured_output import StructuredOutputManager

    targets = [(api_server, "build_app"), (SamplingParams, "_validate_structured_outputs"),
               (ChatCompletionRequest, "extract_structured_outputs"),
               (CompletionRequest, "extract_structured_outputs"),
               (StructuredOutputManager, "__init__"),
               (StructuredOutputManager, "_create_grammar"),
               (scheduler.Scheduler, "update_from_output"), (AsyncLLM, "generate")]
    for owner, name in targets:  # restored after the test
        monkeypatch.setattr(owner, name, getattr(owner, name))
    original = api_server.build_app
    monkeypatch.setenv(plugin.ACTIVE_ENV, str(os.getpid()))
    names = ["server_identity", "request_validation", "legacy_fields", "unenforced_report",
             "engine_backend", "compile_errors", "heap_trim"]
    assert plugin.register() == names
    once = [getattr(owner, name) for owner, name in targets]
    assert plugin.register() == names
    assert [getattr(owner, name) for owner, name in targets] == once
    from dotllm.vllm_ext.patching import patches_on

    assert patches_on(api_server.build_app) == ["server_identity"]
    assert api_server.build_app.__wrapped__ is original


def test_register_does_nothing_without_the_flag(monkeypatch):
    monkeypatch.delenv(plugin.ACTIVE_ENV, raising=False)
    assert plugin.register() == []


@pytest.mark.parametrize("value", ["0", "", "1x", "-5"])
def test_only_the_exact_flag_activates(monkeypatch, value):
    monkeypatch.setenv(plugin.ACTIVE_ENV, value)
    assert plugin.register() == []
