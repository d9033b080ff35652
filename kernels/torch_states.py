"""Device states (dotllm.kernels.states) in plain torch: the CPU runner, and anywhere.

The binary search runs a fixed number of steps over every row at once, so nothing
waits on the device for a data-dependent loop bound.
"""

from __future__ import annotations

import torch

from dotllm.kernels.states import HEADER


def resolve(buffer: torch.Tensor, bases: torch.Tensor, states: torch.Tensor,
            state_slots: torch.Tensor, out: torch.Tensor, positions: torch.Tensor) -> None:
    """out[positions[i]] = the arena slot of the mask row of device state state_slots[i]."""
    k = state_slots.long()
    out[positions.long()] = buffer[(bases[k] + HEADER + states[k]).long()]


def advance(buffer: torch.Tensor, bases: torch.Tensor, states: torch.Tensor,
            state_slots: torch.Tensor, sampled: torch.Tensor, logit_rows: torch.Tensor,
            steps: int) -> None:
    """Move device state state_slots[i] by the token sampled[logit_rows[i], 0]."""
    k = state_slots.long()
    token = sampled[logit_rows.long(), 0].long()
    base = bases[k].long()
    state = states[k].long()
    n = buffer[base].long()
    count = buffer[base + 1].long()
    at_offsets = base + HEADER + n + state
    lo = buffer[at_offsets].long()
    hi = buffer[at_offsets + 1].long()
    at_tokens = base + HEADER + 2 * n + 1
    last = len(buffer) - 1
    left, right = lo, hi
    for _ in range(steps):
        active = left < right
        mid = (left + right) // 2
        value = buffer[(at_tokens + mid).clamp(max=last)].long()
        below = active & (value < token)
        right = torch.where(active & ~below, mid, right)
        left = torch.where(below, mid + 1, left)
    at = (at_tokens + left).clamp(max=last)
    found = (left < hi) & (buffer[at].long() == token)
    target = buffer[(at + count).clamp(max=last)]
    states[k] = torch.where(found, target, states[k])
