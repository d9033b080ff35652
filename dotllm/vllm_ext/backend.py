"""DotLLM as vLLM 0.26's structured-output backend (`backend_types.py` interface)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import torch
from vllm.sampling_params import StructuredOutputsParams
from vllm.v1.structured_output.backend_types import (
    StructuredOutputBackend,
    StructuredOutputGrammar,
    StructuredOutputOptions,
)

from dotllm import embedded_model
from dotllm.compiler.cache import IndexCache
from dotllm.compiler.compiled import CorruptEntry
from dotllm.compiler.manager import CompilationManager
from dotllm.compiler.metrics import CompileMetrics
from dotllm.compiler.pool import CompilePool, PoolLimits
from dotllm.compiler.spec import ConstraintSpec
from dotllm.compiler.vocabulary import Vocabulary
from dotllm.guide import Guide
from dotllm.settings import Settings
from dotllm.vllm_ext import compile_errors
from dotllm.vllm_ext.constraints import spec_from_params

logger = logging.getLogger(__name__)
_CORRUPT = "the cached compiled constraint is corrupt and was dropped; retrying recompiles it"


class DotllmGrammar(StructuredOutputGrammar):
    def __init__(self, guide: Guide):
        self.guide = guide

    def accept_tokens(self, request_id: str, tokens: list[int]) -> bool:
        # False ends the request with an error (vLLM's scheduler); the engine keeps going.
        try:
            return self.guide.accept_tokens(tokens)
        except CorruptEntry as e:
            compile_errors.record(request_id, f"{_CORRUPT}: {e}")
            return False

    def validate_tokens(self, tokens: list[int]) -> list[int]:
        try:
            return self.guide.validate_tokens(tokens)
        except CorruptEntry:
            return []  # the next accept_tokens meets the same block and ends the request

    def rollback(self, num_tokens: int) -> None:
        self.guide.rollback(num_tokens)

    def fill_bitmask(self, bitmask: torch.Tensor, batch_index: int) -> None:
        self.guide.fill_row(bitmask[batch_index].numpy())

    def is_terminated(self) -> bool:
        return self.guide.is_terminated()

    def reset(self):
        self.guide.reset()


@dataclass
class DotllmBackend(StructuredOutputBackend):
    settings: Settings = field(default_factory=Settings.from_environ)

    def __post_init__(self):
        self.vocabulary = Vocabulary.from_tokenizer(self.tokenizer, size=self.vocab_size)
        s = self.settings
        cache = IndexCache(
            memory_bytes=s.index_cache_memory_mib * 2**20,
            disk_dir=s.disk_dir(embedded_model.cache_root()),
            remote_url=s.index_cache_url or None,
        )
        limits = PoolLimits(
            timeout_s=s.compile_timeout,
            max_index_bytes=s.max_index_mib * 2**20,
            max_worker_memory_bytes=s.max_compile_memory_mib * 2**20,
        )
        pool = CompilePool(self.vocabulary, workers=s.workers, limits=limits)
        self.manager = CompilationManager(self.vocabulary, cache, pool, CompileMetrics())
        logger.info("DotLLM structured outputs: %d compile workers, cache %s",
                    s.workers, cache.disk.directory if cache.disk else "memory only")

    def compile_spec(self, spec: ConstraintSpec) -> DotllmGrammar:
        """Blocks until the index is ready (runs in vLLM's grammar thread pool)."""
        compiled = self.manager.get(spec).result()
        return DotllmGrammar(Guide(compiled, self.vocabulary.eos_token_id))

    def compile_grammar(self, request_type: StructuredOutputOptions,
                        grammar_spec: str) -> DotllmGrammar:
        """vLLM's (type, text) key; DotLLM's own path passes whole params to compile_spec."""
        value: object = grammar_spec
        if request_type is StructuredOutputOptions.JSON_OBJECT:
            value = True
        elif request_type is StructuredOutputOptions.CHOICE:
            value = json.loads(grammar_spec)  # vLLM keys choices by their JSON text
        params = StructuredOutputsParams(**{request_type.name.lower(): value})
        return self.compile_spec(spec_from_params(params))

    def allocate_token_bitmask(self, max_num_seqs: int) -> torch.Tensor:
        return torch.full((max_num_seqs, (self.vocab_size + 31) // 32), -1, dtype=torch.int32,
                          pin_memory=torch.cuda.is_available())

    def destroy(self):
        self.manager.shutdown()
