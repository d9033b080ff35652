"""vLLM's `schedule()` for 256 constrained requests in decode: stock `AsyncScheduler` and
with DotLLM's compile-overlap mixin, whose cap every request passes through.

    pytest bench/test_schedule_step.py --benchmark-enable --benchmark-only \
        --benchmark-columns=mean,median,ops

Each timed call is one `schedule()`; the previous step's tokens are accepted between
calls, untimed, as the engine core does with async scheduling.
"""

from __future__ import annotations

import pytest
import torch
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.v1.core.kv_cache_utils import init_none_hash
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.structured_output import StructuredOutputManager
from vllm.v1.structured_output.backend_types import StructuredOutputOptions

from dotllm.vllm_ext.compile_overlap import CompileOverlap
from dotllm.vllm_ext.patching import with_mixin
from tests.conftest import backend  # noqa: F401  (fixture)
from tests.test_compile_overlap import BLOCK, HASH, make_request

ROWS = 256
BLOCKS = 8000
MIXINS = {"stock": (), "overlap": (CompileOverlap,)}


def _scheduler(mixins: tuple[type, ...], embedded_model, backend):  # noqa: F811
    config = VllmConfig(
        scheduler_config=SchedulerConfig(
            max_num_seqs=ROWS, max_num_batched_tokens=8192, max_model_len=1024,
            enable_chunked_prefill=True, async_scheduling=True, is_encoder_decoder=False),
        model_config=ModelConfig(model=str(embedded_model), dtype="float32", seed=0,
                                 skip_tokenizer_init=True),
        cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=True))
    config.cache_config.num_gpu_blocks = BLOCKS
    kv = KVCacheConfig(num_blocks=BLOCKS, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["layer"], FullAttentionSpec(
            block_size=BLOCK, num_kv_heads=1, head_size=1, dtype=torch.float32))])
    manager = StructuredOutputManager(config)
    manager.backend = backend
    cls = AsyncScheduler
    for mixin in mixins:
        cls = with_mixin(mixin, cls)
    init_none_hash(HASH)
    return cls(vllm_config=config, kv_cache_config=kv, log_stats=True,
               structured_output_manager=manager, block_size=BLOCK)


@pytest.mark.parametrize("mixins", list(MIXINS))
def test_schedule_256_constrained_decodes(benchmark, mixins, embedded_model, backend,  # noqa: F811
                                          tokenizer):
    scheduler = _scheduler(MIXINS[mixins], embedded_model, backend)
    digit = tokenizer.encode("7", add_special_tokens=False)[0]
    for i in range(ROWS):
        request, grammar = make_request(f"r{i}", 20, max_tokens=100_000, compiling=False)
        grammar.set_result(backend.compile_grammar(StructuredOutputOptions.REGEX, "[0-9]+"))
        scheduler.add_request(request)
    in_flight = []

    def accept_previous():
        if in_flight:
            out = in_flight.pop()
            ids = list(out.num_scheduled_tokens)
            scheduler.update_from_output(out, ModelRunnerOutput(
                req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                sampled_token_ids=[[digit]] * len(ids)))
        return (), {}

    def schedule():
        in_flight.append(scheduler.schedule())

    for _ in range(3):  # every request past its prompt
        accept_previous()
        schedule()
    benchmark.group = f"schedule(), {ROWS} constrained requests in decode"
    benchmark.pedantic(schedule, setup=accept_previous, rounds=50)
    assert len(in_flight[-1].num_scheduled_tokens) == ROWS
