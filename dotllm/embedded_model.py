"""The embedded default model: a tiny random-weight Llama on Mistral's Tekken tokenizer.

Nothing can be downloaded on the machines DotLLM is developed and tested on, so the
default model is built offline from what the installed packages ship: mistral_common
carries the Tekken vocabulary (131,072 ids, the size real models use), transformers
converts it to a Hugging Face tokenizer, and the weights are random (seeded). The
output is gibberish; the shapes, tokenizer and chat template are real, which is what
serving and constrained decoding need.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

NAME = "tiny-llama-tekken"
# Bump when the recipe below changes, so that a cached build is not reused.
RECIPE_VERSION = 2
_DONE_MARKER = "dotllm-model.json"

# Mistral's format for this tokenizer (Tekken, Mistral NeMo): the tools before the last
# user turn, calls as `[TOOL_CALLS]` and a JSON list, results as `[TOOL_RESULTS]`; vLLM's
# `mistral` tool parser reads it back (TOOL_PARSER, the embedded model's default).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set last_user = namespace(index=-1) %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% set last_user.index = loop.index0 %}{% endif %}{% endfor %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}"
    "{% if tools and loop.index0 == last_user.index %}"
    "[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "[INST] {{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'assistant' %}"
    "{% if message['tool_calls'] %}[TOOL_CALLS]["
    "{% for call in message['tool_calls'] %}{% if not loop.first %}, {% endif %}"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']}"
    " | tojson }}{% endfor %}]"
    "{% else %}{{ message['content'] }}{% endif %}{{ eos_token }}"
    "{% elif message['role'] == 'tool' %}"
    "[TOOL_RESULTS]{{ {'call_id': message['tool_call_id'], 'content': message['content']}"
    " | tojson }}[/TOOL_RESULTS]"
    "{% endif %}"
    "{% endfor %}"
)
TOOL_PARSER = "mistral"

LLAMA_CONFIG = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=1_000_000.0,
    tie_word_embeddings=True,
)


def cache_root() -> Path:
    """Where DotLLM keeps what it builds: $DOTLLM_CACHE_DIR, else the user's cache dir."""
    if env := os.environ.get("DOTLLM_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dotllm"


def default_model_dir() -> Path:
    return cache_root() / "models" / NAME


def is_built(path: Path) -> bool:
    marker = path / _DONE_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("recipe") == RECIPE_VERSION
    except (OSError, ValueError):
        return False


def build(path: Path | None = None, *, force: bool = False, seed: int = 0) -> Path:
    """Build the model into `path` (default: the cache) unless a build is already there.

    The model is written to a temporary sibling directory and renamed into place, so an
    interrupted build never leaves a directory that looks complete, and processes building
    at once never read one another's half-written files.
    """
    path = Path(path) if path is not None else default_model_dir()
    if is_built(path) and not force:
        return path

    import torch
    from mistral_common import __file__ as mistral_common_init
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    tekken = Path(mistral_common_init).parent / "data" / "tekken_240718.json"
    tokenizer = convert_tekken_tokenizer(str(tekken), chat_template=CHAT_TEMPLATE)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="bfloat16",
        **LLAMA_CONFIG,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _DONE_MARKER).write_text(
            json.dumps({"name": NAME, "recipe": RECIPE_VERSION, "seed": seed}) + "\n"
        )
        if path.exists() and (force or not is_built(path)):
            shutil.rmtree(path, ignore_errors=True)
        try:
            staging.rename(path)
        except OSError:  # another process's build came first: its model is the same
            if not is_built(path):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
