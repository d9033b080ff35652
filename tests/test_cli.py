"""The `dotllm` command line: a drop-in for `vllm serve`, with one-line errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from dotllm import __version__, cli
from dotllm.embedded_model import NAME
from tests.conftest import DOTLLM, free_port


def run(*args: str, timeout: float = 180, env: dict | None = None):
    return subprocess.run(
        [str(DOTLLM), *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "dotllm: error:" in line]


def test_version_lists_dotllm_vllm_torch_and_outlines_core():
    result = run("--version")
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["dotllm"] == __version__
    assert lines["vllm"] == "0.26.0"
    assert lines["torch"].startswith("2.11.0")
    assert lines["outlines-core"] == "0.2.14"


def test_help_lists_every_vllm_serve_option_and_dotllm_group():
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    stock = make_arg_parser(FlexibleArgumentParser())
    stock_options = {o for a in stock._actions for o in a.option_strings if o.startswith("--")}
    for args in (["--help"], ["serve", "--help"]):
        result = run(*args)
        assert result.returncode == 0, result.stderr
        assert "usage: dotllm [serve]" in result.stdout
        missing = [o for o in stock_options if o not in result.stdout]
        assert not missing, missing
        assert "--tensor-parallel-size" in result.stdout
        assert "\nDotLLM:\n" in result.stdout
        assert "--dotllm-cache-dir" in result.stdout


def test_help_search_by_group_works_as_in_vllm():
    result = run("serve", "--help=DotLLM")
    assert result.returncode == 0
    assert "--dotllm-cache-dir" in result.stdout
    assert "--tensor-parallel-size" not in result.stdout


def test_unknown_option_is_one_line_and_exit_2():
    result = run("serve", "--no-such-option")
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "dotllm: error: unrecognized arguments: --no-such-option (see `dotllm --help`)"
    ]
    assert "Traceback" not in result.stderr
    assert "usage:" not in result.stderr
    # Nothing else: not the lines importing vLLM and torch log without a GPU.
    assert result.stderr.strip().splitlines() == error_lines(result.stderr)


def test_a_misspelt_option_gets_a_did_you_mean():
    result = run("serve", "--max-modle-len", "5", "--gpu-memory-utilisation=0.5")
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "dotllm: error: unrecognized arguments: --max-modle-len --gpu-memory-utilisation=0.5 "
        "(did you mean --max-model-len, --gpu-memory-utilization?) (see `dotllm --help`)"]


def test_invalid_option_value_is_one_line():
    result = run("serve", "--tensor-parallel-size", "two")
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert "--tensor-parallel-size" in line and "'two'" in line
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["serve", "/no/such/model"], id="serve-positional"),
        pytest.param(["serve", "--model", "/no/such/model"], id="serve-model-option"),
        pytest.param(["--model", "/no/such/model"], id="model-option-only"),
        pytest.param(["/no/such/model", "--port", "0"], id="positional-only"),
    ],
)
def test_missing_model_path_is_one_line(args):
    result = run(*args)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "dotllm: error: model path '/no/such/model' does not exist"
    ]
    assert "Traceback" not in result.stderr


def test_unknown_hub_model_offline_is_one_line():
    result = run("serve", "nobody/no-such-model", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert "'nobody/no-such-model'" in line and "HF_HUB_OFFLINE" in line


def test_a_hub_model_that_cannot_be_fetched_is_one_line():
    """Online but no way to the Hub (as on CI) or no such model: one line, not vLLM's
    100-line traceback from its loader."""
    result = run("serve", "nobody/no-such-model", env={"HF_HUB_OFFLINE": "0"})
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert "'nobody/no-such-model'" in line
    assert "the Hub cannot be reached" in line or "is not on the Hugging Face Hub" in line
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "form",
    [
        pytest.param(lambda m, p: ["serve", m, "--port", p], id="serve-positional"),
        pytest.param(lambda m, p: ["serve", "--model", m, "--port", p], id="serve-model-option"),
        pytest.param(lambda m, p: ["--model", m, "--port", p], id="model-option-only"),
        pytest.param(lambda m, p: ["--port", p], id="embedded-default"),
    ],
)
def test_every_form_starts_the_server_and_port_in_use_is_one_line(form, embedded_model):
    """Each form gets as far as binding the port (after parsing and validation)."""
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", port))
        busy.listen()
        result = run(*form(str(embedded_model), str(port)))
    assert result.returncode == 1, result.stderr[-3000:]
    assert error_lines(result.stderr)[-1].endswith(
        f"dotllm: error: cannot listen on 0.0.0.0:{port}: address already in use "
        "(choose another --port)"
    )
    assert "Traceback" not in result.stderr


def parse(argv: list[str], on_gpu: bool = False):
    args = cli.build_serve_parser(on_gpu).parse_args(argv)
    cli.resolve_model(args)
    return args


def test_parse_forms_agree(embedded_model):
    m = str(embedded_model)
    forms = [[m, "-tp", "1"], ["--model", m, "-tp", "1"], ["-tp", "1", "--model", m]]
    parsed = [parse(f) for f in forms]
    assert {a.model for a in parsed} == {m}
    assert {a.tensor_parallel_size for a in parsed} == {1}


@pytest.mark.parametrize("argv, on_gpu, backend", [
    ([], True, "mp"),
    (["--distributed-executor-backend", "uni"], True, "uni"),
    (["-tp", "2"], True, None),
    (["--data-parallel-size", "2"], True, None),
    ([], False, None),
])
def test_the_executor_on_a_gpu(embedded_model, argv, on_gpu, backend):
    args = parse(argv, on_gpu)
    cli.settle_executor(args, on_gpu)
    assert args.distributed_executor_backend == backend


@pytest.mark.parametrize("argv, env, on_gpu, mib", [
    ([], None, True, 512),
    ([], None, False, 0),
    (["--dotllm-device-states-mib", "0"], None, True, 0),
    ([], "64", True, 64),
    (["--dotllm-device-states-mib", "32"], "64", True, 32),
])
def test_device_states_default_on_a_gpu(embedded_model, monkeypatch, argv, env, on_gpu, mib):
    if env is not None:
        monkeypatch.setenv("DOTLLM_DEVICE_STATES_MIB", env)
    args = parse(argv, on_gpu)
    assert cli.dotllm_settings(args).device_states_mib == mib


def test_no_model_serves_the_embedded_one_under_its_name(embedded_model):
    args = parse([])
    assert args.model == str(embedded_model)
    assert args.served_model_name == [NAME]
    args = parse(["--served-model-name", "mine"])
    assert args.served_model_name == ["mine"]


@pytest.mark.parametrize("argv, parser, auto", [
    ([], "mistral", True),
    (["--tool-call-parser", "hermes"], "hermes", True),
    (["--no-enable-auto-tool-choice"], "mistral", False),
])
def test_the_embedded_model_gets_its_tool_parser_unless_told_otherwise(
        embedded_model, argv, parser, auto):
    args = parse(argv)
    assert (args.tool_call_parser, args.enable_auto_tool_choice) == (parser, auto)


def test_a_named_model_keeps_vllms_tool_defaults(embedded_model):
    args = parse([str(embedded_model)])
    assert (args.tool_call_parser, args.enable_auto_tool_choice) == (None, False)


def test_cpu_defaults_are_overridable(embedded_model):
    assert parse([]).dtype == "float32"
    assert parse(["--dtype", "bfloat16"]).dtype == "bfloat16"
    assert parse([], on_gpu=True).dtype == "auto"


def test_vllm_options_keep_their_meaning(embedded_model):
    args = parse(["--max-model-len", "1K", "--enable-prefix-caching", "--port", "9001",
                  "--structured-outputs-config.backend", "xgrammar"])
    assert args.max_model_len == 1024
    assert args.enable_prefix_caching is True
    assert args.port == 9001
    assert args.structured_outputs_config.backend == "xgrammar"


def test_model_build_and_path(tmp_path):
    out = tmp_path / "m"
    result = run("model", "build", "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert (out / "config.json").is_file()
    result = run("model", "path", env={"DOTLLM_CACHE_DIR": str(tmp_path)})
    assert result.stdout.strip() == str(tmp_path / "models" / NAME)


def test_model_command_errors_are_one_line():
    result = run("model", "frobnicate")
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert "frobnicate" in line and "dotllm model --help" in line


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "dotllm.cli", "--version"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stdout.startswith(f"dotllm {__version__}\n")


@pytest.mark.parametrize("option", [["--dotllm-compile-workers", "-1"],
                                    ["--dotllm-compile-timeout", "0"]])
def test_bad_dotllm_option_values_are_one_line(option):
    result = run("serve", *option)
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert "--dotllm-compile-workers must be >= 0" in line


@pytest.mark.parametrize(("url", "message"), [("nosuchproto://bucket/x", "Protocol not known"),
                                              ("s3://bucket/x", "Install s3fs")])
def test_cache_url_without_its_fsspec_backend_is_one_line(url, message):
    result = run("serve", "--dotllm-index-cache-url", url)
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert f"--dotllm-index-cache-url {url}" in line and message in line


@pytest.mark.parametrize(("kernel", "message"), [("fast", "unknown mask kernel 'fast'"),
                                                 ("cuda", "not available on cpu")])
def test_mask_kernel_that_cannot_run_here_is_one_line(kernel, message):
    if kernel == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run("serve", "--dotllm-mask-kernel", kernel)
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert "dotllm: error: --dotllm-mask-kernel" in line and message in line


def test_unknown_constraint_engine_is_one_line():
    result = run("serve", "--dotllm-constraint-engine", "xgrammar")
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert "--dotllm-constraint-engine: invalid choice: 'xgrammar'" in line
    assert "'tiered', 'outlines', 'llguidance'" in line
