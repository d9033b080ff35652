"""The `cpu_spec_expand` patch (dotllm/vllm_ext/cpu_spec_expand.py): on CPU, the rejection
sampler's per-position temperatures, top-k and top-p are the requests' own."""

from __future__ import annotations

import pytest
import torch

from dotllm.vllm_ext.cpu_spec_expand import expand_batch_to_tokens

GREEDY = 0  # vLLM's GREEDY_TEMPERATURE, which the sampler expands as 1


def _expected(values, counts, replace_from, replace_to):
    return [replace_to if v == replace_from else v
            for v, n in zip(values, counts, strict=True) for _ in range(n)]


@pytest.mark.parametrize(("values", "dtype", "replace"), [
    ([0.7, GREEDY, 1.3, 0.25], torch.float32, (GREEDY, 1)),  # temperature
    ([40, 0, 1, 7], torch.int32, (0, 0)),  # top-k
    ([0.9, 1.0, 0.5, 0.95], torch.float32, (0, 0)),  # top-p
    ([3, 1, 4, 1], torch.int64, (1, 9)),
])
@pytest.mark.parametrize("counts", [[7, 1, 3, 2], [0, 4, 0, 1], [1, 1, 1, 1]])
def test_each_requests_value_fills_its_positions(values, dtype, replace, counts):
    x = torch.tensor(values, dtype=dtype)
    cu = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    out = expand_batch_to_tokens(x, cu, sum(counts), *replace)
    assert out.dtype == dtype
    assert out.tolist() == pytest.approx(_expected(values, counts, *replace))


def test_vllms_cpu_kernel_leaves_a_float_output_unwritten():
    """Why the patch: vLLM 0.26's CPU shim fills an int64 copy of the output (remove the
    patch once this fails on a vLLM that fixed vllm-project/vllm#55005)."""
    import vllm.utils.cpu_triton_utils as cpu_tl
    from vllm.platforms.cpu import CpuPlatform

    CpuPlatform.import_kernels()  # the CPU kernels' ops, built for this CPU (not vllm._C's
    # AVX-512 on an AVX2 host: SIGILL)

    out = torch.full((6,), 123.0)
    cpu_tl.expand_kernel[(3,)](out, torch.tensor([0.5, 0.0, 2.0]),
                               torch.tensor([2, 5, 6], dtype=torch.int32), GREEDY, 1,
                               MAX_NUM_TOKENS=128)
    assert out.tolist() == [123.0] * 6
