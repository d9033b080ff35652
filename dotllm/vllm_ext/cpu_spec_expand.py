"""Patch `cpu_spec_expand`: sampled speculative decoding on CPU gets its real temperatures.

vLLM's rejection sampler spreads each request's temperature, top-k and top-p over its draft
positions with `expand_batch_to_tokens`: a Triton kernel writing into `x.new_empty(n)`. On
the CPU platform the model runner swaps the kernel for a C++ one that takes int64 only, and
the shim converts the output to int64 first (vllm/utils/cpu_triton_utils.py, vLLM 0.26): the
kernel fills the copy, and the float32 temperatures the sampler then divides by are
uninitialized memory (upstream vllm-project/vllm#55005, open). Seen in DotLLM: with
--dotllm-forced-drafts at temperature 1, 94 of 107 drafts were rejected, forced ones
included (their probability came out NaN), and the answers' distribution moved
(tests/test_forced_drafts.py). Greedy requests never read these values.

Here the whole function is one `repeat_interleave` on the CPU platform, which is what the
kernel computes (a value per request, repeated over its positions, `replace_from` read as
`replace_to`). Other platforms keep vLLM's kernel.

Target: `expand_batch_to_tokens` (vLLM 0.26, vllm/v1/sample/rejection_sampler.py), read by
that module's `apply_sampling_constraints` when it runs.
"""

from __future__ import annotations

import torch

from dotllm.vllm_ext.patching import replace_attribute

NAME = "cpu_spec_expand"


def expand_batch_to_tokens(x: torch.Tensor, cu_num_tokens: torch.Tensor, num_tokens: int,
                           replace_from: int = 0, replace_to: int = 0) -> torch.Tensor:
    """x[i] repeated over request i's positions (`cu_num_tokens` ends them), with
    `replace_from` written as `replace_to`."""
    assert cu_num_tokens.shape[0] == x.shape[0]
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    expanded = x.repeat_interleave(counts, output_size=num_tokens)
    return expanded.masked_fill(expanded == replace_from, replace_to)


def apply(in_launcher: bool) -> bool:
    if in_launcher:
        return False
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.v1.sample import rejection_sampler

    replace_attribute(rejection_sampler, "expand_batch_to_tokens",
                      lambda _stock: expand_batch_to_tokens, NAME)
    return True
