"""A full-size model without weights: bench/llama-1.3b/config.json (Llama-shaped, 1.3B:
hidden 2048, 16 layers, 32 heads, 8 KV heads, vocab 131,072, tied embeddings) beside the
embedded model's Tekken tokenizer. Served with `--load-format dummy` (random weights), it
gives real-size step times on a GPU with nothing downloaded.

    python -m bench.full_size_model DIR      # prints DIR once built
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

CONFIG = Path(__file__).resolve().parent / "llama-1.3b" / "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json")


def build(path: Path) -> Path:
    from dotllm import embedded_model

    embedded = embedded_model.build()
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(CONFIG, path / "config.json")
    for name in TOKENIZER_FILES:
        shutil.copy(embedded / name, path / name)
    return path


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
