"""A full-size model without weights: bench/llama-1.3b/config.json (Llama-shaped, 1.3B:
hidden 2048, 16 layers, 32 heads, 8 KV heads, vocab 131,072, tied embeddings) beside the
embedded model's Tekken tokenizer. Served with `--load-format dummy` (random weights), it
gives real-size step times on a GPU with nothing downloaded.

    python -m bench.full_size_model DIR [--max-positions N]   # prints DIR once built

`--max-positions` raises the config's 4,096 positions for long prompts: vLLM's rotary
cache has as many rows, and a position past them fails a device-side assert (random
weights: nothing was trained on the extra positions, nothing is lost).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

CONFIG = Path(__file__).resolve().parent / "llama-1.3b" / "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json")


def build(path: Path, max_positions: int | None = None) -> Path:
    from dotllm import embedded_model

    embedded = embedded_model.build()
    path.mkdir(parents=True, exist_ok=True)
    config = json.loads(CONFIG.read_text())
    if max_positions is not None:
        config["max_position_embeddings"] = max_positions
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        shutil.copy(embedded / name, path / name)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--max-positions", type=int)
    args = parser.parse_args()
    print(build(args.dir, args.max_positions))
