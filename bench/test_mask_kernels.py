"""Bitmask kernels on a CUDA GPU: DotLLM's CUDA and Triton kernels vs xgrammar's
`apply_token_bitmask_inplace` (what stock vLLM's V1 runner calls) and a naive torch
version, both forms (given rows, gathered rows), against the DRAM floor.

    bash bench/gpu_kernels.sh        # on the GPU machine: builds, tests, runs this, reports

Each round applies the op to `calls` different logits buffers (256 MiB in all, more than
L2 holds) back to back and synchronizes once, so a call's time is what a serving step
pays: the host's dispatch and launch when the GPU is idle (small batches), device time
when the launch queue is full (large ones). `bench.mask_kernels_report` turns the JSON
into the table in bench/RESULTS.md.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dotllm import kernels

pytestmark = pytest.mark.gpu

BATCHES = (1, 16, 64, 256, 1024, 4096)
SHAPES = ((131_072, torch.bfloat16), (131_072, torch.float32), (32_000, torch.bfloat16),
          (152_064, torch.bfloat16))
# Each bit is the AND of this many random bits: 1/64 of tokens allowed (most disallowed, as
# in JSON), or half of them.
DENSITIES = {"json": 6, "random": 1}
IMPLS = ("given/cuda", "given/triton", "given/xgrammar", "given/torch",
         "gathered/cuda", "gathered/triton", "gathered/torch",
         "staged/cuda",  # the server's path for llguidance's rows: host rows, pinned copy
         "planned/cuda")  # and for an index's: table kept on the device, one int32 a row
TABLE_ROWS = 256  # per-state masks resident on the GPU (gathered form)
BUFFER_BYTES = 256 << 20


def _masks(rows: int, words: int, ands: int, generator) -> torch.Tensor:
    masks = torch.full((rows, words), -1, dtype=torch.int32, device="cuda")
    for _ in range(ands):
        masks &= torch.randint(-2**31, 2**31, (rows, words), dtype=torch.int32, device="cuda",
                               generator=generator)
    return masks


def _apply_fn(impl: str, words: int):
    form, name = impl.split("/")
    if name == "xgrammar":
        import xgrammar

        return lambda logits, masks, ids: xgrammar.apply_token_bitmask_inplace(logits, masks)
    if kernels._load(name) is None:
        pytest.skip(f"{name} kernel not built here")
    if form in ("staged", "planned"):
        from dotllm.kernels.arena import MaskArena, RowPlan

        arena = MaskArena(torch.device("cuda"), words, kernel=name)
        if form == "staged":
            return lambda logits, masks, rows: arena.apply(logits, RowPlan.of_rows(masks), rows)
        uploaded = []

        def planned(logits, table, slots):  # the table goes up with the first step only
            uploads = [] if uploaded else [(np.arange(len(table), dtype=np.int32), table)]
            uploaded.append(True)
            plan = RowPlan(words, slots, np.empty((0, words), np.int32), uploads)
            arena.apply(logits, plan, np.arange(len(slots), dtype=np.int32))
        return planned
    if form == "given":
        return lambda logits, masks, ids: kernels.apply_token_bitmask(logits, masks, kernel=name)
    return lambda logits, table, ids: kernels.apply_token_bitmask_gathered(
        logits, table, ids, kernel=name)


def floor_bytes(masks: torch.Tensor, dtype: torch.dtype, ids: torch.Tensor | None) -> int:
    """Bytes that must cross DRAM: the mask words (and row ids) read, and each 32-byte
    sector of logits holding a disallowed token written, read first if it also holds an
    allowed one (DRAM moves whole sectors)."""
    rows = masks if ids is None else masks[ids.long()]
    tokens_per_sector = 32 // (torch.finfo(dtype).bits // 8)
    sectors = rows.view(torch.int16 if tokens_per_sector == 16 else torch.uint8)
    full_allowed = int((sectors == -1).sum()) if tokens_per_sector == 16 else int(
        (sectors == 255).sum())
    none_allowed = int((sectors == 0).sum())
    partial = sectors.numel() - full_allowed - none_allowed
    index_bytes = 0 if ids is None else ids.numel() * 4
    return rows.numel() * 4 + index_bytes + 32 * none_allowed + 64 * partial


@pytest.mark.parametrize("density", list(DENSITIES))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(("vocab", "dtype"), SHAPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("impl", IMPLS)
def test_apply_bitmask(benchmark, impl, vocab, dtype, batch, density):
    form = impl.split("/")[0]
    words = (vocab + 31) // 32
    apply = _apply_fn(impl, words)
    generator = torch.Generator(device="cuda")
    generator.manual_seed(batch * 7919 + vocab)
    logits_bytes = batch * vocab * torch.finfo(dtype).bits // 8
    calls = max(2, min(256, BUFFER_BYTES // logits_bytes))
    logits = [torch.randn(batch, vocab, device="cuda", dtype=dtype, generator=generator)
              for _ in range(calls)]
    if form in ("given", "staged"):
        masks = [_masks(batch, words, DENSITIES[density], generator) for _ in range(calls)]
        ids = [None] * calls
    else:
        table = _masks(TABLE_ROWS, words, DENSITIES[density], generator)
        masks = [table] * calls
        ids = [torch.randint(0, TABLE_ROWS, (batch,), device="cuda", dtype=torch.int32,
                             generator=generator) for _ in range(calls)]

    floor = floor_bytes(masks[0], dtype, ids[0])
    if form == "staged":  # rows start on the host, as the scheduler's numpy array
        masks = [m.cpu().numpy() for m in masks]
        ids = [np.arange(batch, dtype=np.int32)] * calls
    elif form == "planned":  # the plan names slots of a table the arena holds
        masks = [masks[0].cpu().numpy()] * calls
        ids = [i.cpu().numpy() for i in ids]

    def run_round():
        for i in range(calls):
            apply(logits[i], masks[i], ids[i])
        torch.cuda.synchronize()

    run_round()  # compile, load, warm up
    benchmark.group = f"{form} V={vocab} {str(dtype)[6:]} {density}"
    benchmark.extra_info.update(
        form=form, kernel=impl.split("/")[1], vocab=vocab, dtype=str(dtype)[6:], batch=batch,
        density=density, calls=calls,
        floor_bytes=floor,
        h2d_bytes=(sum(m.nbytes for m in masks[:1]) + batch * 4 if form == "staged"
                   else batch * 8 if form == "planned" else 0))
    benchmark.pedantic(run_round, rounds=7, warmup_rounds=1)


def test_copy_bandwidth(benchmark):
    """The DRAM ceiling for the floor: a 1 GiB device-to-device copy (bytes read + written)."""
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)

    def copy():
        for _ in range(10):
            dst.copy_(src)
        torch.cuda.synchronize()

    copy()
    benchmark.extra_info.update(kind="copy", bytes_per_round=10 * 2 * src.nbytes)
    benchmark.pedantic(copy, rounds=5, warmup_rounds=1)


def test_host_to_device_bandwidth(benchmark):
    """What the staged path's copy can reach: 256 MiB from pinned memory to the GPU."""
    src = torch.empty(1 << 26, dtype=torch.float32, pin_memory=True).uniform_()
    dst = torch.empty(1 << 26, dtype=torch.float32, device="cuda")

    def copy():
        for _ in range(4):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()

    copy()
    benchmark.extra_info.update(kind="h2d", bytes_per_round=4 * src.nbytes)
    benchmark.pedantic(copy, rounds=5, warmup_rounds=1)
