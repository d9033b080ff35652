"""Bitmask kernels against a plain reference, on fresh random data each run.

On CPU (CI): the torch path, and the Triton kernel through its interpreter. On a CUDA
device (marked gpu; run them there with `bench/gpu_kernels.sh`): every kernel available.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dotllm import kernels
from tests.conftest import run_under_triton_interpreter

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _implementations():
    if INTERPRETING:  # the run test_triton_kernel_under_the_interpreter starts
        return [pytest.param(("cpu", "triton"), id="triton-interpreter")]
    impls = [pytest.param(("cpu", "torch"), id="torch-cpu")]
    for name in ("cuda", "triton", "torch"):
        impls.append(pytest.param(("cuda", name), id=f"{name}-cuda", marks=pytest.mark.gpu))
    return impls


@pytest.mark.skipif(INTERPRETING, reason="this is that run")
def test_triton_kernel_under_the_interpreter():
    run_under_triton_interpreter(__file__, "triton-interpreter")


@pytest.fixture(params=_implementations())
def impl(request):
    device, name = request.param
    if (apply := kernels._load(name)) is None:
        pytest.skip(f"{name} kernel not built here")
    return device, apply


def reference(logits, masks, logit_rows, mask_rows):
    """Bit by bit, in numpy, on float64 copies."""
    out = logits.double().cpu().numpy().copy()
    masks = masks.cpu().numpy()
    vocab = out.shape[1]
    rows = (len(logit_rows) if logit_rows is not None else
            len(mask_rows) if mask_rows is not None else len(masks))
    for i in range(rows):
        target = int(logit_rows[i]) if logit_rows is not None else i
        source = int(mask_rows[i]) if mask_rows is not None else i
        if source < 0:
            continue
        bits = np.unpackbits(masks[source].view(np.uint8), bitorder="little").astype(bool)
        allowed = np.zeros(vocab, dtype=bool)
        n = min(vocab, len(bits))
        allowed[:n] = bits[:n]
        out[target, ~allowed] = -np.inf
    return torch.from_numpy(out)


def random_logits(rows, vocab, dtype, device, generator, width=None):
    """Random values, never zeros; rows may be a slice of a wider buffer (stride > vocab)."""
    full = torch.randn(rows, width or vocab, generator=generator, dtype=torch.float32) + 3.0
    return full.to(device=device, dtype=dtype)[:, :vocab]


def random_masks(rows, words, generator, density=0.5):
    bits = torch.rand(rows, words * 32, generator=generator) < density
    packed = np.packbits(bits.numpy(), axis=1, bitorder="little").view(np.int32)
    return torch.from_numpy(packed.copy())


def check(apply, device, logits, masks, logit_rows=None, mask_rows=None):
    expected = reference(logits, masks, logit_rows, mask_rows)
    to = dict(device=device)
    apply(logits, masks.to(**to),
          None if logit_rows is None else logit_rows.to(**to),
          None if mask_rows is None else mask_rows.to(**to))
    got = logits.double().cpu()
    assert not got.isnan().any()
    assert torch.equal(got, expected.to(got.dtype)), (got != expected).nonzero()[:5]


@pytest.fixture
def generator():
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh data each run
    return g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 1000, 4099, 20_000])
def test_random_masks(impl, dtype, vocab, generator):
    device, apply = impl
    words = (vocab + 31) // 32
    for rows in (1, 3, 17):
        logits = random_logits(rows, vocab, dtype, device, generator)
        check(apply, device, logits, random_masks(rows, words, generator))


@pytest.mark.parametrize("density", [0.0, 1.0, 0.02, 0.98])
def test_sparse_dense_all_and_none(impl, density, generator):
    device, apply = impl
    vocab, rows = 5000, 4
    masks = random_masks(rows, (vocab + 31) // 32, generator, density)
    if density == 0.0:  # none allowed but one token per row
        for r in range(rows):
            t = int(torch.randint(vocab, (1,), generator=generator))
            masks[r, t >> 5] = np.int32(np.uint32(1 << (t & 31)).view(np.int32))
    check(apply, device, random_logits(rows, vocab, torch.bfloat16, device, generator), masks)


def test_all_allowed_writes_nothing(impl, generator):
    device, apply = impl
    logits = random_logits(5, 3000, torch.float32, device, generator)
    before = logits.clone()
    apply(logits, torch.full((5, 94), -1, dtype=torch.int32, device=device), None, None)
    assert torch.equal(logits, before)


@pytest.mark.parametrize(("vocab", "words"), [(3000, 80), (3000, 100), (2560, 80)])
def test_padded_and_narrower_logits(impl, vocab, words, generator):
    """Logits wider than the mask: extra columns disallowed; narrower: the mask is cut."""
    device, apply = impl
    logits = random_logits(6, vocab, torch.float32, device, generator, width=vocab + 13)
    check(apply, device, logits, random_masks(6, words, generator, density=0.7))


def test_index_subsets(impl, generator):
    device, apply = impl
    vocab, batch = 4099, 12
    indices = torch.randperm(batch, generator=generator)[:5].int()
    logits = random_logits(batch, vocab, torch.float16, device, generator)
    check(apply, device, logits, random_masks(5, 129, generator), logit_rows=indices)


def test_gathered_rows(impl, generator):
    device, apply = impl
    vocab, batch, states = 4099, 16, 7
    table = random_masks(states, 129, generator, density=0.1)
    row_ids = torch.randint(-1, states, (batch,), generator=generator).int()
    row_ids[0] = -1
    logits = random_logits(batch, vocab, torch.bfloat16, device, generator)
    check(apply, device, logits, table, mask_rows=row_ids)


def test_gathered_rows_into_chosen_logits(impl, generator):
    """Both indexes at once, as the worker's arena launches: table rows by slot (some -1)
    into logits rows in any order."""
    device, apply = impl
    logits = random_logits(10, 777, torch.bfloat16, device, generator)
    table = random_masks(6, 25, generator)
    logit_rows = torch.tensor([7, 2, 9, 0, 4], dtype=torch.int32)
    mask_rows = torch.tensor([5, -1, 0, 5, 3], dtype=torch.int32)
    check(apply, device, logits, table, logit_rows, mask_rows)


@pytest.mark.gpu
@pytest.mark.parametrize(("rows", "vocab"), [(1, 152_064), (64, 152_064), (1024, 32_000),
                                             (4096, 32_000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_batches_on_gpu(impl, rows, vocab, dtype, generator):
    device, apply = impl
    if device != "cuda":
        pytest.skip("CPU implementations are covered at small sizes")
    logits = random_logits(rows, vocab, dtype, device, generator)
    masks = random_masks(rows, (vocab + 31) // 32, generator, density=0.05)
    check(apply, device, logits, masks)


def test_dispatcher_checks_and_names(generator):
    logits = random_logits(2, 64, torch.float32, "cpu", generator)
    masks = random_masks(2, 2, generator)
    kernels.apply_token_bitmask(logits, masks)  # auto picks the torch path on CPU
    assert torch.equal(logits.double(), reference(logits, masks, None, None))
    with pytest.raises(ValueError, match="not available on cpu"):
        kernels.apply_token_bitmask(logits, masks, kernel="cuda")
    with pytest.raises(ValueError, match="unknown mask kernel"):
        kernels.apply_token_bitmask(logits, masks, kernel="fast")
    with pytest.raises(ValueError, match="int32"):
        kernels.apply_token_bitmask(logits, masks.long())
    with pytest.raises(ValueError, match="3 bitmask rows for 2 logits rows"):
        kernels.apply_token_bitmask(logits, random_masks(3, 2, generator))
    with pytest.raises(ValueError, match="1 indices for 2 bitmask rows"):
        kernels.apply_token_bitmask(logits, masks, torch.tensor([0], dtype=torch.int32))
    row_ids = torch.tensor([-1, 1], dtype=torch.int32)
    before = logits.clone()
    kernels.apply_token_bitmask_gathered(logits, masks, row_ids)
    assert torch.equal(logits[0], before[0])
