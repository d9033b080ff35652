"""Patch `server_identity`: GET /version also names DotLLM and its version.

Clients and operators can then tell a DotLLM server from a stock vLLM one; the
`version` field keeps vLLM's meaning, so existing clients see no change.

Target: `vllm.entrypoints.openai.api_server.build_app` (vLLM 0.26), looked up as a
module global by `build_and_serve`. Applied in the process `dotllm` started (the API
server) and in any process that already runs the API server module (extra API servers
of `--api-server-count`), never in engine-core or worker processes.
"""

from __future__ import annotations

import functools

from dotllm.vllm_ext.patching import api_server_module, replace_attribute

NAME = "server_identity"
_TARGET = "vllm.entrypoints.openai.api_server"


def version_info() -> dict[str, str]:
    from vllm.version import __version__ as vllm_version

    from dotllm import __version__

    return {"version": vllm_version, "dotllm": __version__}


def _add_identity_route(build_app):
    @functools.wraps(build_app)
    def build_app_with_identity(*args, **kwargs):
        from fastapi.responses import JSONResponse

        app = build_app(*args, **kwargs)

        async def show_version() -> JSONResponse:
            return JSONResponse(content=version_info())

        app.add_api_route("/version", show_version, methods=["GET"])
        # Routes match in order: move ours ahead of vLLM's own /version.
        app.router.routes.insert(0, app.router.routes.pop())
        return app

    return build_app_with_identity


def apply(in_launcher: bool) -> bool:
    api_server = api_server_module(_TARGET, in_launcher)
    if api_server is None:
        return False
    replace_attribute(api_server, "build_app", _add_identity_route, NAME)
    return True
