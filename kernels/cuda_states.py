"""Device states (dotllm.kernels.states) by DotLLM's CUDA extension (csrc/states.cu).

Built by setup.py where CUDA and nvcc are present, as the bitmask kernel is; without it
this module does not import, and `states.implementation` takes Triton's. Launched from
C++, the two ops cost the worker's step ~44 us less host time than Triton's launches
from Python (H100: 162 against 206 us for 256 rows' mask work, bench/RESULTS.md).
"""

from __future__ import annotations

import torch

from dotllm import _states_cuda  # its kHeader is states.HEADER


def resolve(buffer: torch.Tensor, bases: torch.Tensor, states: torch.Tensor,
            state_slots: torch.Tensor, out: torch.Tensor, positions: torch.Tensor) -> None:
    """out[positions[i]] = the arena slot of the mask row of device state state_slots[i]."""
    _states_cuda.resolve(buffer, bases, states, state_slots, out, positions)


def advance(buffer: torch.Tensor, bases: torch.Tensor, states: torch.Tensor,
            state_slots: torch.Tensor, sampled: torch.Tensor, logit_rows: torch.Tensor,
            steps: int) -> None:
    """Move device state state_slots[i] by the token sampled[logit_rows[i], 0] (the search
    ends by itself: `steps`, the fixed bound the other implementations need, is unused)."""
    _states_cuda.advance(buffer, bases, states, state_slots, sampled, logit_rows)
