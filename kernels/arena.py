"""A step's mask rows on the logits' device: compiled tables kept there, one gathered launch.

Most constrained rows are a row of a compiled index's per-state mask table, and a table
serves every step of every request on its constraint. So a model worker keeps tables in
an arena of rows on the logits' device, written once (`RowPlan.uploads`), and a step
names each such row by its slot: one int32 crosses to the device instead of 16 KiB. Rows
no table holds (llguidance's, computed per step) travel with the step and are staged into
the arena's scratch rows behind the tables; then one launch masks every row by slot.

The engine core decides which table goes in which slots and when a slot is reused
(dotllm.mask_plan.RowPlanner): the arena only obeys, so every worker of a tensor-parallel
group holds the same rows. On CUDA the host buffers are pinned once (grown when a step
needs more) and every copy is queued on the compute stream, in order with the kernels
that read what it writes: a step's copies (an index buffer of 8 KiB at 256 rows and its
own rows) take the GPU a few microseconds, and each op the worker's Python does not make
is host time off the step's critical path (issue 12: a side stream and its events were
five ops a step). A host buffer is rewritten only after the copy that read it finished:
the buffers are two, used in turn, so a step waits for the copy of the step before the
last (with async scheduling the host prepares a step while the GPU may still be on the
one before). A table or blob new on the device goes through torch's pinned host
allocator, which holds the block until its copy is done, so no upload waits for the GPU.

Rows may also be named by a device state (dotllm.kernels.states): a request on an index
whose state the device advances from each sampled token. Its row's slot is read on the
device from the state, and after sampling (`advance`, called by the runner's sampling
hook) the state moves by the token sampled, so the next step's plan needs nothing the
host learns from this one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from dotllm.kernels import implementation, kernel_name
from dotllm.kernels import states as device_states

UNCONSTRAINED = -1  # a slot that masks nothing (a finished constraint)
DEVICE_STATE = -(2**31)  # a slot read on the device from the row's state (`RowPlan.states`)


def direct_slot(j: int) -> int:
    """The slot naming the step's own row j (`RowPlan.direct[j]`)."""
    return -2 - j


class MaskedRows(NamedTuple):
    """A step's rows masked, by where each row came from."""

    table: int  # a table row named by its slot
    state: int  # a table row a device state named
    step: int  # a row sent with the step


@dataclass
class RowPlan:
    """A step's bitmask rows, in vLLM's order: what `GrammarOutput.grammar_bitmask` carries
    when DotLLM builds it. slots[i] >= 0 is an arena slot holding a table row,
    `UNCONSTRAINED`, or `direct_slot(j)` for direct[j]."""

    words: int  # int32 words a row
    slots: np.ndarray  # int32 [rows]
    direct: np.ndarray  # int32 [n, words]: rows computed for this step
    # (slots int32 [k], rows int32 [k, words]) to write into the arena first, in order.
    uploads: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    # Rows whose slot is DEVICE_STATE: states[i] is the device state slot naming row i's
    # mask (-1 elsewhere); None when no row is.
    states: np.ndarray | None = None
    # (state slots, blob bases, local states) int32 [m] each: device states set first.
    state_inits: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    # (offset in the blob buffer, int32 blob) to write first: indexes new on the device.
    blob_uploads: list[tuple[int, np.ndarray]] = field(default_factory=list)

    @classmethod
    def of_rows(cls, bitmask: np.ndarray) -> RowPlan:
        """Every row sent with the step (a bitmask built by vLLM's own loop)."""
        return cls(bitmask.shape[1], -2 - np.arange(len(bitmask), dtype=np.int32), bitmask)

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def writes_device(self) -> bool:
        """Whether the step writes to the workers' device memory before it masks (table
        rows, its own rows, transitions, device states set)."""
        return bool(self.uploads or len(self.direct) or self.blob_uploads
                    or (self.state_inits is not None and len(self.state_inits[0])))

    @property
    def nbytes(self) -> int:
        """Bytes the step sends to the workers."""
        extra = 0 if self.states is None else self.states.nbytes
        if self.state_inits is not None:
            extra += sum(a.nbytes for a in self.state_inits)
        return (self.slots.nbytes + self.direct.nbytes + extra
                + sum(s.nbytes + r.nbytes for s, r in self.uploads)
                + sum(b.nbytes for _, b in self.blob_uploads))


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over `array` without a copy, also when the array is a read-only view (a
    table used in place from the disk cache's memory map): nothing here writes to it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """`array` on `device`, queued on the current stream; from CPU memory torch's pinned
    allocator keeps until the copy has read it (a pageable copy would wait for the GPU)."""
    tensor = _tensor(array)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


class MaskArena:
    def __init__(self, device: torch.device, words: int, kernel: str = "auto",
                 initial_rows: int = 256):
        self.device = torch.device(device)
        self.words = words
        self.kernel = kernel_name(kernel, self.device)  # fails here, not mid-step
        self._apply = implementation(self.kernel, self.device.type)
        self._cuda = self.device.type == "cuda"
        self._table_rows = 0  # arena rows [0, table_rows) hold tables, then scratch
        self._scratch_rows = 0
        self._arena = torch.empty((0, words), dtype=torch.int32, device=self.device)
        self._states_impl = device_states.implementation(self.device)
        self._search_steps = device_states.search_steps(32 * words)
        self._blobs = torch.empty(0, dtype=torch.int32, device=self.device)
        self._bases = torch.zeros(0, dtype=torch.int32, device=self.device)
        self._states = torch.zeros(0, dtype=torch.int32, device=self.device)
        # (state slots, logits rows) of the last step's device-state rows, for `advance`
        self._to_advance: tuple[torch.Tensor, torch.Tensor] | None = None
        self._last: _LastStep | None = None
        self._staged = 0  # capacity of the pinned step buffers
        if self._cuda:
            self._copied = (torch.cuda.Event(), torch.cuda.Event())  # by host buffer
            self._turn = 0  # the host buffers this step fills
            self._grow_staging(initial_rows)

    # -- growth (rare: a wider step, or tables in higher slots than before) ---------------

    def _quiesce(self) -> None:
        if self._cuda:
            torch.cuda.current_stream(self.device).synchronize()

    def _grow_arena(self, table_rows: int, scratch_rows: int) -> None:
        table_rows = max(table_rows, self._table_rows)
        scratch_rows = max(scratch_rows, self._scratch_rows)
        if (table_rows, scratch_rows) == (self._table_rows, self._scratch_rows):
            return
        if table_rows > self._table_rows:
            table_rows = max(table_rows, 2 * self._table_rows)
        if scratch_rows > self._scratch_rows:
            scratch_rows = max(scratch_rows, 2 * self._scratch_rows)
        self._quiesce()
        arena = torch.empty((table_rows + scratch_rows, self.words), dtype=torch.int32,
                            device=self.device)
        arena[:self._table_rows] = self._arena[:self._table_rows]
        self._arena, self._table_rows, self._scratch_rows = arena, table_rows, scratch_rows

    def _grown(self, tensor: torch.Tensor, size: int) -> torch.Tensor:
        """`tensor`, or a copy at least twice as long when `size` does not fit."""
        if size <= len(tensor):
            return tensor
        self._quiesce()
        grown = torch.zeros(max(size, 2 * len(tensor)), dtype=tensor.dtype, device=self.device)
        grown[:len(tensor)] = tensor
        return grown

    def _grow_states(self, plan: RowPlan) -> None:
        blobs_end = max((o + len(b) for o, b in plan.blob_uploads), default=0)
        self._blobs = self._grown(self._blobs, blobs_end)
        slots = 0
        if plan.states is not None and len(plan.states):
            slots = int(plan.states.max()) + 1
        if plan.state_inits is not None and len(plan.state_inits[0]):
            slots = max(slots, int(plan.state_inits[0].max()) + 1)
        self._bases = self._grown(self._bases, slots)
        self._states = self._grown(self._states, slots)

    def _grow_staging(self, rows: int) -> None:
        if self._staged:
            self._quiesce()
        self._staged = max(rows, 2 * self._staged)
        self._host_direct = tuple(torch.empty((self._staged, self.words), dtype=torch.int32,
                                              pin_memory=True) for _ in self._copied)
        # targets, slots; device-state rows: positions, state slots, logits rows;
        # state inits: slots, bases, states
        self._host_index = tuple(torch.empty((8, self._staged), dtype=torch.int32,
                                             pin_memory=True) for _ in self._copied)
        self._device_index = torch.empty((8, self._staged), dtype=torch.int32,
                                         device=self.device)

    # -- a step ---------------------------------------------------------------------------

    def apply(self, logits: torch.Tensor, plan: RowPlan, logit_rows: np.ndarray,
              sources: np.ndarray | None = None) -> MaskedRows:
        """Mask logits[logit_rows[i]] with the plan's row sources[i] (or i), in place;
        returns the rows masked, by where each came from."""
        self._to_advance = None
        logit_rows = np.asarray(logit_rows, dtype=np.int32)
        key = _LastStep.key_of(plan, logit_rows, sources)
        if self._last is not None and self._last.repeated_by(key):
            return self._launch(logits, self._last.launch)
        slots = plan.slots if sources is None else plan.slots[sources]
        constrained = slots != UNCONSTRAINED
        slots = slots[constrained]
        table = int((slots >= 0).sum())
        targets = logit_rows[constrained]
        on_device = np.flatnonzero(slots == DEVICE_STATE).astype(np.int32)
        state_slots = np.empty(0, dtype=np.int32)
        if len(on_device):
            states = plan.states if sources is None else plan.states[sources]
            state_slots = states[constrained][on_device]
            slots = slots.copy()
            slots[on_device] = 0  # resolved on the device
        highest = max((int(s.max()) + 1 for s, _ in plan.uploads if len(s)), default=0)
        if len(slots):
            highest = max(highest, int(slots.max()) + 1)
        masked = MaskedRows(table, len(on_device), len(slots) - table - len(on_device))
        self._grow_arena(highest, len(plan.direct))
        self._grow_states(plan)
        # The step's own rows sit behind the tables.
        slots = np.where(slots <= -2, self._table_rows - 2 - slots, slots).astype(np.int32)
        device_rows = (on_device, state_slots, targets[on_device])
        for upload_slots, rows in plan.uploads:  # rare: a table's first step
            self._arena.index_copy_(0, _to_device(upload_slots.astype(np.int64), self.device),
                                    _to_device(rows, self.device))
        if self._cuda:
            launch = self._stage_cuda(plan, slots, targets, device_rows, masked)
        else:
            n = len(plan.direct)
            self._arena[self._table_rows:self._table_rows + n] = torch.from_numpy(plan.direct)
            inits = plan.state_inits
            self._write_states(plan, None if inits is None else
                               tuple(torch.from_numpy(a) for a in inits))
            launch = _Launch(torch.from_numpy(targets), torch.from_numpy(slots),
                             tuple(torch.from_numpy(a) for a in device_rows)
                             if len(on_device) else None, masked)
        self._last = None if key is None else _LastStep(key, launch)
        return self._launch(logits, launch)

    def _launch(self, logits: torch.Tensor, launch: _Launch) -> MaskedRows:
        """The step's launches on the compute stream, over index tensors on the device."""
        if launch.device_rows is not None:
            self._resolve(launch.slots, *launch.device_rows)
        if launch.masked.table or launch.masked.state or launch.masked.step:
            self._apply(logits, self._arena, launch.targets, launch.slots)
        return launch.masked

    def warm_up(self) -> None:
        """Masks and advances a one-state index once for each logits and token dtype a
        runner may hand over, so that compiling the kernels (Triton's JIT: the states'
        ops took ~1 s on a fresh H200) happens at start, not in the first constrained
        request's step. What it writes (slot 0, blob offset 0, state slot 0) is written
        again by any plan before one reads it."""
        zero = np.zeros(1, dtype=np.int32)
        one_state = device_states.blob(np.zeros(2, dtype=np.int32), zero[:0], zero[:0], zero)
        plan = RowPlan(self.words, np.array([DEVICE_STATE], dtype=np.int32),
                       np.zeros((0, self.words), dtype=np.int32),
                       [(zero, np.full((1, self.words), -1, dtype=np.int32))],
                       states=zero, state_inits=(zero, zero, zero),
                       blob_uploads=[(0, one_state)])
        for logits_dtype in (torch.float32, torch.bfloat16):
            for token_dtype in (torch.int32, torch.int64):
                logits = torch.zeros((1, 32 * self.words), dtype=logits_dtype,
                                     device=self.device)
                self.apply(logits, plan, zero)
                self.advance(torch.zeros((1, 1), dtype=token_dtype, device=self.device))
        if self._cuda:
            torch.cuda.synchronize(self.device)

    def _write_states(self, plan: RowPlan,
                      inits: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> None:
        """The plan's new blobs and state inits (on the current stream)."""
        for offset, blob in plan.blob_uploads:
            self._blobs[offset:offset + len(blob)] = _to_device(blob, self.device)
        if inits is not None and len(inits[0]):
            slots = inits[0].long()
            self._bases[slots] = inits[1]
            self._states[slots] = inits[2]

    def _resolve(self, slots: torch.Tensor, positions: torch.Tensor, state_slots: torch.Tensor,
                 rows: torch.Tensor) -> None:
        """Device-state rows' slots into `slots`; remembered for `advance`."""
        self._states_impl.resolve(self._blobs, self._bases, self._states, state_slots,
                                  slots, positions)
        self._to_advance = (state_slots, rows)

    def advance(self, sampled: torch.Tensor) -> None:
        """After sampling the last step applied: each device state moves by its row's token
        (sampled: [logits rows, >= 1] token ids on the logits' device)."""
        if self._to_advance is None:
            return
        state_slots, rows = self._to_advance
        self._to_advance = None
        self._states_impl.advance(self._blobs, self._bases, self._states, state_slots,
                                  sampled, rows, self._search_steps)

    def _stage_cuda(self, plan: RowPlan, slots: np.ndarray, targets: np.ndarray,
                    device_rows: tuple[np.ndarray, ...], masked: MaskedRows) -> _Launch:
        """The step's rows, index columns and states copied on the compute stream, ahead
        of the launches that read them."""
        count, n = len(slots), len(plan.direct)
        inits = plan.state_inits or (np.empty(0, dtype=np.int32),) * 3
        m, k = len(device_rows[0]), len(inits[0])
        if max(count, n, k) > self._staged:
            self._grow_staging(max(count, n, k))
        turn, self._turn = self._turn, 1 - self._turn
        copied, host_direct, host_index = (
            self._copied[turn], self._host_direct[turn], self._host_index[turn])
        copied.synchronize()  # the copy that last read these host buffers is over
        host_direct.numpy()[:n] = plan.direct
        index = host_index.numpy()
        index[0, :count], index[1, :count] = targets, slots
        for row, values in enumerate((*device_rows, *inits), start=2):
            index[row, :len(values)] = values
        # Each op skipped when it has nothing to do: the worker's Python per step is on
        # the step's critical path (issue 12), ~10 us a torch call from Python.
        if n:
            self._arena[self._table_rows:self._table_rows + n].copy_(
                host_direct[:n], non_blocking=True)
        # The whole buffer (8 KiB at 256 rows): a column slice of it is not contiguous,
        # which torch copies through a pageable temporary (made, then staged by the
        # driver): that line was ~30 % of the worker's mask time in a schema mix's steps
        # on an H100 host (py-spy, 2026-12-07).
        self._device_index.copy_(host_index, non_blocking=True)
        copied.record(torch.cuda.current_stream(self.device))
        self._write_states(plan, tuple(self._device_index[5:8, :k]) if k else None)
        index = self._device_index
        return _Launch(index[0, :count], index[1, :count],
                       (index[2, :m], index[3, :m], index[4, :m]) if m else None, masked)


@dataclass
class _Launch:
    """A step's index tensors, as its launches read them."""

    targets: torch.Tensor  # logits rows
    slots: torch.Tensor  # arena rows (device-state rows' resolved by `_resolve` first)
    # (positions in slots, state slots, logits rows) of device-state rows; None: none
    device_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    masked: MaskedRows


@dataclass
class _LastStep:
    """A step that wrote nothing to the device (no uploads, rows, states): the same step
    again, as the engine core sends when it repeats a plan (every row held on the device,
    dotllm.mask_plan), launches over the index tensors the last one left on the device,
    with no staging, copy or stream switch (issue 12: the worker's host time a step). A
    device-state row's slot is resolved anew from its state by that launch."""

    key: tuple[bytes | None, ...]  # the step's index arrays, compared as bytes (~0.3 us)
    launch: _Launch

    @staticmethod
    def key_of(plan: RowPlan, logit_rows: np.ndarray,
               sources: np.ndarray | None) -> tuple[bytes | None, ...] | None:
        """None for a step that writes to the device."""
        if plan.writes_device:
            return None
        return (plan.slots.astype(np.int32, copy=False).tobytes(),
                None if plan.states is None else plan.states.astype(np.int32, copy=False).tobytes(),
                logit_rows.tobytes(),
                None if sources is None else np.asarray(sources, dtype=np.int64).tobytes())

    def repeated_by(self, key: tuple[bytes | None, ...] | None) -> bool:
        return key is not None and key == self.key
