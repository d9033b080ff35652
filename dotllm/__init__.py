"""DotLLM: a drop-in `vllm serve` with fast, cached, crash-proof structured outputs."""

__version__ = "0.1.0"
