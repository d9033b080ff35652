"""Patch `engine_backend`: DotLLM compiles, caches and guides every structured output.

Targets (vLLM 0.26, engine-core process):
- `StructuredOutputManager.__init__`: preset `backend` with DotLLM's; vLLM builds its own
  only while `backend is None`. Built at engine start so that the first request does not
  pay for the vocabulary and the compile workers.
- `StructuredOutputManager.executor`: vLLM sizes it for CPU-bound compiles (1 thread on 2
  cores); DotLLM's compiles run in its process pool and its cache lookups wait on I/O, so
  a compiling schema must not hold up a cached one queued behind it.
- `StructuredOutputManager._create_grammar`: pass the request's whole
  `StructuredOutputsParams` (whitespace pattern included), not vLLM's (type, text) key,
  record why a compile failed for `compile_errors` to tell the client, and mark a
  request whose constraint waits for a compile (`compile_overlap` lets its prompt
  prefill meanwhile, and a long prompt's request wait for its index behind it).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from dotllm.vllm_ext.patching import replace_attribute

NAME = "engine_backend"
logger = logging.getLogger(__name__)
_GRAMMAR_THREADS = 64


def _with_dotllm_backend(stock_init):
    from dotllm.vllm_ext.backend import DotllmBackend

    def __init__(self, vllm_config):
        stock_init(self, vllm_config)
        if vllm_config.model_config.skip_tokenizer_init:
            return
        self.backend = DotllmBackend(vllm_config, tokenizer=self.tokenizer,
                                     vocab_size=vllm_config.model_config.get_vocab_size())
        self.executor.shutdown(wait=False)
        self.executor = ThreadPoolExecutor(max_workers=_GRAMMAR_THREADS,
                                           thread_name_prefix="dotllm-grammar")

    return __init__


def _compiling_whole_params(stock_create):
    from dotllm.vllm_ext import compile_errors, compile_overlap
    from dotllm.vllm_ext.backend import DotllmBackend
    from dotllm.vllm_ext.constraints import spec_from_params

    def _create_grammar(self, request):
        if not isinstance(self.backend, DotllmBackend):
            return stock_create(self, request)
        constraint = request.structured_output_request
        try:
            spec = spec_from_params(constraint.params)
            return self.backend.compile_spec(
                spec, on_wait=lambda: compile_overlap.mark(constraint),
                behind_prefill=compile_overlap.prefill_waiter(self, request))
        except Exception as e:
            logger.warning("request %s: constraint failed: %s", request.request_id, e)
            reason = getattr(e, "reason", None) or getattr(e, "kind", "invalid")
            compile_errors.record(request.request_id, str(e), reason)
            raise

    return _create_grammar


def apply(in_launcher: bool) -> bool:
    from vllm.v1.structured_output import StructuredOutputManager

    replace_attribute(StructuredOutputManager, "__init__", _with_dotllm_backend, NAME)
    replace_attribute(StructuredOutputManager, "_create_grammar", _compiling_whole_params, NAME)
    return True
