"""Requests on a compiled index advanced on the device, from the token just sampled.

vLLM 0.26 with async scheduling defers a step's sampling while any request of the step
has a grammar whose previous token the host has not accepted yet (the next mask depends
on it): the host's accept and fill then sit between every forward pass and its sampling.
A request on an index needs no host for its next mask if the device holds its state and
the index's transitions: after sampling, its state moves by the sampled token, and the
next step names its mask row by that state, resolved on the device. The host still
accepts every token (it checks them, ends the request, hands over), a few at a time
behind the device (`DotllmGrammar.follow_device`), and EOS at once.

An index lives on the device as one int32 blob in a buffer shared by all indexes:

    [N, T, slot[0..N), offsets[0..N], tokens[0..T), targets[0..T)]

N states, T transitions; slot[s] is the arena slot holding state s's mask row; state s
moves by tokens[offsets[s]:offsets[s + 1]] (sorted) to targets[...] (local state ids). A
device state is (base of its index's blob, local state), one entry of two int32 vectors
indexed by a state slot the engine core hands out (dotllm.mask_plan). A token the state
does not allow (only possible where all logits were masked) leaves the state as it is:
the host's accept rejects that token and ends the request.

Implementations, one module each: `cuda` (csrc/states.cu, an optional compiled
extension), `triton` (CUDA; also under TRITON_INTERPRET=1) and `torch` (CPU, and
anywhere).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import numpy as np
import torch

HEADER = 2  # N, T


def blob(offsets: np.ndarray, tokens: np.ndarray, targets: np.ndarray,
         state_slots: np.ndarray) -> np.ndarray:
    """An index's device blob (layout above) from its CSR transitions and row slots."""
    n, t = len(state_slots), len(tokens)
    out = np.empty(HEADER + n + (n + 1) + 2 * t, dtype=np.int32)
    out[0], out[1] = n, t
    out[HEADER:HEADER + n] = state_slots
    at = HEADER + n
    out[at:at + n + 1] = offsets
    at += n + 1
    out[at:at + t] = tokens
    out[at + t:] = targets
    return out


def implementations(device: torch.device) -> list[str]:
    """Names of the implementations that run on `device`, the one to use first."""
    if device.type == "cuda":
        names = ["cuda", "triton", "torch"]
    elif os.environ.get("TRITON_INTERPRET") == "1":
        names = ["triton", "torch"]
    else:
        names = ["torch"]
    return [name for name in names if named(name) is not None]


def implementation(device: torch.device) -> ModuleType:
    """The module with `resolve` and `advance` for `device`."""
    return named(implementations(device)[0])


def named(name: str) -> ModuleType | None:
    """The implementation `name` ("cuda", "triton", "torch"); None where it does not
    import here."""
    try:
        return importlib.import_module(f"dotllm.kernels.{name}_states")
    except ImportError:  # no extension built, no Triton here
        return None


def search_steps(vocab_size: int) -> int:
    """Binary-search steps that find any token among a state's (at most vocab_size)."""
    return max(1, int(vocab_size).bit_length())
