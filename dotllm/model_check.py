"""Say early, in one line, when the model to serve cannot be found.

Without this check vLLM binds the port, starts its engine and fails deep inside the
Hugging Face client with a long traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

_OFFLINE_VALUES = {"1", "true", "yes", "on"}


def looks_like_path(model: str) -> bool:
    """A Hugging Face id is `name` or `org/name`; anything else is meant as a path."""
    return model.startswith(("/", ".", "~")) or model.count("/") > 1


def model_problem(model: str, environ: os._Environ | dict = os.environ) -> str | None:
    """Why `model` cannot be served from here, or None if it can (as far as we can tell)."""
    path = Path(model).expanduser()
    if path.exists():
        return None
    if looks_like_path(model):
        return f"model path {model!r} does not exist"
    if _in_hf_cache(model):
        return None
    if environ.get("HF_HUB_OFFLINE", "").lower() in _OFFLINE_VALUES:
        return (
            f"model {model!r} is neither a local directory nor in the Hugging Face cache, "
            "and HF_HUB_OFFLINE is set (unset it to download)"
        )
    return _hub_problem(model)


def _hub_problem(repo_id: str) -> str | None:
    """Ask the Hub (a few seconds at most) before vLLM does it with a long traceback."""
    import huggingface_hub
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
    )

    try:
        huggingface_hub.model_info(repo_id, timeout=10)
    except GatedRepoError:
        return f"model {repo_id!r} is gated on the Hugging Face Hub: accept its terms and " \
               "set HF_TOKEN"
    except RepositoryNotFoundError:
        return f"model {repo_id!r} is not on the Hugging Face Hub (a private one needs " \
               "HF_TOKEN), nor a local directory"
    except HFValidationError as e:
        return f"model {repo_id!r} is neither a local directory nor a Hugging Face id ({e})"
    except HfHubHTTPError:
        return None  # the Hub answered; let vLLM's loader say what it makes of it
    except Exception as e:  # no network: DNS, refused, timed out, proxy
        return (f"model {repo_id!r} is not in the Hugging Face cache and the Hub cannot "
                f"be reached ({type(e).__name__}: {e}); download it where there is a "
                "network, or serve a local directory")
    return None


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        return any(
            isinstance(try_to_load_from_cache(repo_id, name), str)
            for name in ("config.json", "params.json")
        )
    except HFValidationError:
        return False
