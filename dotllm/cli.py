"""`dotllm`: the command line, a drop-in for `vllm serve`.

    dotllm [serve] [MODEL] [vllm serve options] [DotLLM options]
    dotllm --version
    dotllm model build [--output DIR] [--force]

Without a model, the embedded tiny model is served (built on first use).
"""

from __future__ import annotations

import argparse
import atexit
import difflib
import errno
import importlib.metadata
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

from dotllm import __version__, embedded_model, serve_defaults
from dotllm.model_check import model_problem
from dotllm.settings import Settings

PROG = "dotllm"
USAGE = "dotllm [serve] [model_tag] [options]"
DESCRIPTION = """Serve a model with vLLM's OpenAI-compatible API, with DotLLM's structured
outputs. Takes every `vllm serve` option with vLLM's meaning. Without a model, serves
DotLLM's embedded tiny model (built offline on first use).

Search by using: `--help=<ConfigGroup>` to explore options by section (e.g.,
--help=ModelConfig, --help=DotLLM)."""


class UsageError(Exception):
    """A problem with what the user asked for, reported in one line (exit status 2)."""


def fail(message: str, status: int = 1) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def versions() -> dict[str, str]:
    from dotllm.vllm_ext import serve_cli

    def dist_version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "dotllm": __version__,
        **serve_cli.versions(),
        "torch": dist_version("torch"),
        "outlines-core": dist_version("outlines_core"),
    }


def _one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """argparse prints the whole usage before an error; vLLM's usage is hundreds of lines."""

    def error(message: str):
        raise UsageError(f"{message}{_suggestion(parser, message)} (see `dotllm --help`)")

    parser.error = error  # type: ignore[method-assign]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _one_line_errors(sub)
    return parser


def _suggestion(parser: argparse.ArgumentParser, message: str) -> str:
    """`--max-modle-len` -> " (did you mean --max-model-len?)"."""
    if not message.startswith("unrecognized arguments: "):
        return ""
    options = [o for action in parser._actions for o in action.option_strings
               if o.startswith("--")]
    close = []
    for word in message.removeprefix("unrecognized arguments: ").split():
        if word.startswith("--"):
            close += difflib.get_close_matches(word.split("=", 1)[0], options, n=1, cutoff=0.8)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def add_dotllm_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("DotLLM", "DotLLM's own options.")
    group.add_argument(
        "--dotllm-cache-dir",
        default=None,
        help="Where DotLLM keeps what it builds (the embedded model, compiled "
        "constraints). Default: $DOTLLM_CACHE_DIR, else ~/.cache/dotllm.",
    )
    from_environ = Settings.from_environ()  # DOTLLM_<NAME> variables as defaults
    for f in fields(Settings):
        group.add_argument(
            "--dotllm-" + f.name.replace("_", "-"), dest="dotllm_" + f.name,
            type=type(f.default), default=getattr(from_environ, f.name), help=f.metadata["help"],
            choices=f.metadata["choices"],
        )


def dotllm_settings(args: argparse.Namespace) -> Settings:
    settings = Settings(
        **{f.name: getattr(args, "dotllm_" + f.name) for f in fields(Settings)})
    if settings.compile_workers < 0 or settings.compile_timeout <= 0:
        raise UsageError("--dotllm-compile-workers must be >= 0 and "
                         "--dotllm-compile-timeout > 0")
    if settings.index_cache_url:
        check_cache_url(settings.index_cache_url)
    check_mask_kernel(settings.mask_kernel)
    return settings


def check_mask_kernel(kernel: str) -> None:
    """Fail at start, not in the first constrained step, when the kernel cannot run here."""
    import torch

    from dotllm.kernels import kernel_name

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kernel_name(kernel, device)
    except ValueError as e:
        raise UsageError(f"--dotllm-mask-kernel: {e}") from None


def check_cache_url(url: str) -> None:
    """Fail at start, not in the engine, when no fsspec backend can open the URL."""
    import fsspec
    from fsspec.core import split_protocol

    protocol = split_protocol(url)[0] or "file"
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as e:
        raise UsageError(f"--dotllm-index-cache-url {url}: {e}") from None


def build_serve_parser(on_gpu: bool) -> argparse.ArgumentParser:
    from dotllm.vllm_ext import serve_cli

    parser = serve_cli.build_parser(PROG, USAGE, DESCRIPTION)
    add_dotllm_options(parser)
    # None means "not given": serve the embedded model instead of vLLM's default, and
    # give the embedded model its tool options.
    parser.set_defaults(model=None, enable_auto_tool_choice=None,
                        **serve_defaults.option_defaults(on_gpu),
                        **serve_defaults.dotllm_defaults(on_gpu, os.environ))
    return _one_line_errors(parser)


def resolve_model(args: argparse.Namespace) -> None:
    """Settle which model to serve, building the embedded one if none was named."""
    if args.model_tag is not None:
        args.model = args.model_tag
    embedded = args.model is None
    if embedded:
        # Tool calls as its chat template writes them; either option given wins.
        if args.tool_call_parser is None:
            args.tool_call_parser = embedded_model.TOOL_PARSER
        if args.enable_auto_tool_choice is None:
            args.enable_auto_tool_choice = True
        tools = (f"tool calls: --tool-call-parser {args.tool_call_parser}"
                 + (", auto tool choice" if args.enable_auto_tool_choice else ""))
        print(f"{PROG}: no model given, serving the embedded model ({tools})", file=sys.stderr)
        args.model = str(embedded_model.build())
        if args.served_model_name is None:
            args.served_model_name = [embedded_model.NAME]
    args.enable_auto_tool_choice = bool(args.enable_auto_tool_choice)
    args.model_tag = args.model
    if problem := model_problem(args.model):
        raise UsageError(problem)


def settle_executor(args: argparse.Namespace, on_gpu: bool) -> None:
    """vLLM's executor for this many GPUs, unless given (serve_defaults.executor_backend)."""
    args.distributed_executor_backend = serve_defaults.executor_backend(
        on_gpu, args.distributed_executor_backend,
        args.tensor_parallel_size * args.pipeline_parallel_size * args.data_parallel_size)


def share_metrics_across_processes() -> None:
    """DotLLM's metrics are recorded in the engine process and served by the API server:
    prometheus_client's multiprocess mode, in a directory of this run's own (before any
    process imports prometheus_client). A directory the user set is used as it is."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        return
    directory = tempfile.mkdtemp(prefix="dotllm-metrics-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory


def serve(argv: list[str]) -> int:
    from dotllm.vllm_ext import forced_drafts, plugin, serve_cli

    share_metrics_across_processes()
    on_gpu = serve_defaults.has_gpu()
    serve_defaults.apply_environment(os.environ, on_gpu)

    if "-h" in argv or "--help" in argv:
        argv = [a for a in argv if a not in ("-h", "--help")] + ["--help=all"]
    try:
        parser = build_serve_parser(on_gpu)
        args = parser.parse_args(argv)
        if args.dotllm_cache_dir:
            os.environ["DOTLLM_CACHE_DIR"] = args.dotllm_cache_dir
        os.environ.update(dotllm_settings(args).to_environ())
        resolve_model(args)
        serve_cli.validate(args)
        settle_executor(args, on_gpu)
        if not on_gpu:
            serve_defaults.bind_cpu_workers(
                os.environ, args.tensor_parallel_size * args.pipeline_parallel_size)
    except UsageError as e:
        return fail(str(e), 2)
    except (ValueError, TypeError, KeyError) as e:
        return fail(str(e).removeprefix("Error: "), 2)

    # The user's own backend choice is honoured: stock vLLM's, with DotLLM's hooks off
    # (an A/B switch in one install). Otherwise the hooks go in here, after parsing, and
    # in every process vLLM starts (the plugin reads the variable `activate` sets).
    stock = args.structured_outputs_config.backend
    if stock == "auto":
        plugin.activate()
        plugin.register()
        drafts = args.dotllm_forced_drafts
        if drafts > 0 and args.speculative_config is None:
            args.speculative_config = forced_drafts.speculative_config(drafts)
    else:
        print(f"dotllm: --structured-outputs-config.backend {stock}: structured outputs: "
              f"stock vLLM's {stock}, DotLLM's engine off", file=sys.stderr, flush=True)
    try:
        serve_cli.serve(args, dotllm_hooks=stock == "auto")
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise
        where = args.uds or f"{args.host or '0.0.0.0'}:{args.port}"
        return fail(f"cannot listen on {where}: address already in use (choose another --port)")
    except KeyboardInterrupt:
        return 130
    return 0


def model_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dotllm model",
        description="Manage DotLLM's embedded default model (built offline, never downloaded).",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="Build the embedded model and print its directory.")
    build.add_argument(
        "--output", type=Path, default=None,
        help=f"Directory to build into (default: {embedded_model.default_model_dir()})",
    )
    build.add_argument("--force", action="store_true", help="Rebuild even if already built.")
    sub.add_parser("path", help="Print where the embedded model is (or will be) built.")
    _one_line_errors(parser)
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        return fail(str(e).replace("dotllm --help", "dotllm model --help"), 2)
    if args.action == "path":
        print(embedded_model.default_model_dir())
    else:
        print(embedded_model.build(args.output, force=args.force))
    return 0


# What importing vLLM and torch logs on a machine without a GPU (Triton has no driver,
# no CUDA runtime): four lines before every one-line message of `dotllm`'s own, saying
# nothing a user can act on. The server's other processes still log them.
_IMPORT_NOISE = ("vllm.triton_utils.importing", "torch.utils.cpp_extension")


def _quiet_import_noise() -> None:
    for name in _IMPORT_NOISE:
        logging.getLogger(name).addFilter(lambda record: False)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_import_noise()
    if argv[:1] in (["-v"], ["--version"]):
        for name, version in versions().items():
            print(f"{name} {version}")
        return 0
    if argv[:1] == ["model"]:
        return model_command(argv[1:])
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    return serve(argv)


if __name__ == "__main__":
    sys.exit(main())
