"""Device states (dotllm.kernels.states) in Triton: one program a row, one launch an op.

The torch path costs a launch per search step on a GPU (some 18 steps of several ops at
V=131,072); here a row's search is a loop of scalar loads in one program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dotllm.kernels.states import HEADER


@triton.jit
def _resolve_kernel(buffer_ptr, bases_ptr, states_ptr, state_slots_ptr, out_ptr,
                    positions_ptr, HEAD: tl.constexpr):
    i = tl.program_id(0)
    k = tl.load(state_slots_ptr + i)
    base = tl.load(bases_ptr + k).to(tl.int64)
    state = tl.load(states_ptr + k)
    slot = tl.load(buffer_ptr + base + HEAD + state)
    tl.store(out_ptr + tl.load(positions_ptr + i), slot)


@triton.jit
def _advance_kernel(buffer_ptr, bases_ptr, states_ptr, state_slots_ptr, sampled_ptr,
                    sampled_stride, logit_rows_ptr, steps, HEAD: tl.constexpr):
    i = tl.program_id(0)
    k = tl.load(state_slots_ptr + i)
    row = tl.load(logit_rows_ptr + i).to(tl.int64)
    token = tl.load(sampled_ptr + row * sampled_stride).to(tl.int32)
    base = tl.load(bases_ptr + k).to(tl.int64)
    state = tl.load(states_ptr + k)
    n = tl.load(buffer_ptr + base)
    count = tl.load(buffer_ptr + base + 1)
    at_offsets = base + HEAD + n + state
    lo = tl.load(buffer_ptr + at_offsets)
    hi = tl.load(buffer_ptr + at_offsets + 1)
    at_tokens = base + HEAD + 2 * n + 1
    left = lo
    right = hi
    for _ in range(steps):
        active = left < right
        mid = (left + right) // 2
        value = tl.load(buffer_ptr + at_tokens + mid, mask=active, other=0)
        below = active & (value < token)
        right = tl.where(active & (value >= token), mid, right)
        left = tl.where(below, mid + 1, left)
    inside = left < hi
    value = tl.load(buffer_ptr + at_tokens + left, mask=inside, other=-1)
    found = inside & (value == token)
    target = tl.load(buffer_ptr + at_tokens + count + left, mask=found, other=0)
    tl.store(states_ptr + k, tl.where(found, target, state))


def resolve(buffer: torch.Tensor, bases: torch.Tensor, states: torch.Tensor,
            state_slots: torch.Tensor, out: torch.Tensor, positions: torch.Tensor) -> None:
    """out[positions[i]] = the arena slot of the mask row of device state state_slots[i]."""
    if len(state_slots):
        _resolve_kernel[(len(state_slots),)](buffer, bases, states, state_slots, out,
                                             positions, HEAD=HEADER, num_warps=1)


def advance(buffer: torch.Tensor, bases: torch.Tensor, states: torch.Tensor,
            state_slots: torch.Tensor, sampled: torch.Tensor, logit_rows: torch.Tensor,
            steps: int) -> None:
    """Move device state state_slots[i] by the token sampled[logit_rows[i], 0]."""
    if len(state_slots):
        _advance_kernel[(len(state_slots),)](buffer, bases, states, state_slots, sampled,
                                             sampled.stride(0), logit_rows, steps,
                                             HEAD=HEADER, num_warps=1)
