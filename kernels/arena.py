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
needs more), copies go on a side stream while the compute stream is busy with the forward
pass, and two events keep reuse safe: a host buffer is rewritten only after the copy that
read it finished, and arena rows only after the kernel that read them finished.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from dotllm.kernels import implementation, kernel_name

UNCONSTRAINED = -1  # a slot that masks nothing (a finished constraint)


def direct_slot(j: int) -> int:
    """The slot naming the step's own row j (`RowPlan.direct[j]`)."""
    return -2 - j


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

    @classmethod
    def of_rows(cls, bitmask: np.ndarray) -> RowPlan:
        """Every row sent with the step (a bitmask built by vLLM's own loop)."""
        return cls(bitmask.shape[1], -2 - np.arange(len(bitmask), dtype=np.int32), bitmask)

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def nbytes(self) -> int:
        """Bytes the step sends to the workers."""
        return (self.slots.nbytes + self.direct.nbytes
                + sum(s.nbytes + r.nbytes for s, r in self.uploads))


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over `array` without a copy, also when the array is a read-only view (a
    table used in place from the disk cache's memory map): nothing here writes to it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


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
        self._staged = 0  # capacity of the pinned step buffers
        if self._cuda:
            self._stream = torch.cuda.Stream(self.device)
            self._copied = torch.cuda.Event()
            self._consumed = torch.cuda.Event()
            self._grow_staging(initial_rows)

    # -- growth (rare: a wider step, or tables in higher slots than before) ---------------

    def _quiesce(self) -> None:
        if self._cuda:
            torch.cuda.current_stream(self.device).synchronize()
            self._stream.synchronize()

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

    def _grow_staging(self, rows: int) -> None:
        if self._staged:
            self._quiesce()
        self._staged = max(rows, 2 * self._staged)
        self._host_direct = torch.empty((self._staged, self.words), dtype=torch.int32,
                                        pin_memory=True)
        self._host_index = torch.empty((2, self._staged), dtype=torch.int32, pin_memory=True)
        self._device_index = torch.empty_like(self._host_index, device=self.device)

    # -- a step ---------------------------------------------------------------------------

    def apply(self, logits: torch.Tensor, plan: RowPlan, logit_rows: np.ndarray,
              sources: np.ndarray | None = None) -> int:
        """Mask logits[logit_rows[i]] with the plan's row sources[i] (or i), in place;
        returns the rows masked."""
        slots = plan.slots if sources is None else plan.slots[sources]
        constrained = slots != UNCONSTRAINED
        slots = slots[constrained]
        targets = np.asarray(logit_rows, dtype=np.int32)[constrained]
        highest = max((int(s.max()) + 1 for s, _ in plan.uploads if len(s)), default=0)
        if len(slots):
            highest = max(highest, int(slots.max()) + 1)
        self._grow_arena(highest, len(plan.direct))
        # The step's own rows sit behind the tables.
        slots = np.where(slots <= -2, self._table_rows - 2 - slots, slots).astype(np.int32)
        if self._cuda:
            self._apply_cuda(logits, plan, slots, targets)
        else:
            for upload_slots, rows in plan.uploads:
                self._arena[torch.from_numpy(upload_slots).long()] = _tensor(rows)
            n = len(plan.direct)
            self._arena[self._table_rows:self._table_rows + n] = torch.from_numpy(plan.direct)
            if len(slots):
                self._apply(logits, self._arena, torch.from_numpy(targets),
                            torch.from_numpy(slots))
        return len(slots)

    def _apply_cuda(self, logits: torch.Tensor, plan: RowPlan, slots: np.ndarray,
                    targets: np.ndarray) -> None:
        count, n = len(slots), len(plan.direct)
        if max(count, n) > self._staged:
            self._grow_staging(max(count, n))
        self._copied.synchronize()  # the previous copy has read the host buffers
        self._host_direct.numpy()[:n] = plan.direct
        index = self._host_index.numpy()
        index[0, :count], index[1, :count] = targets, slots
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(self._consumed)  # the previous kernel has read the arena
            for upload_slots, rows in plan.uploads:  # rare: a table's first step
                rows_on_device = _tensor(rows).to(self.device)
                self._arena.index_copy_(
                    0, torch.from_numpy(upload_slots).to(self.device).long(), rows_on_device)
            self._arena[self._table_rows:self._table_rows + n].copy_(
                self._host_direct[:n], non_blocking=True)
            self._device_index[:, :count].copy_(self._host_index[:, :count], non_blocking=True)
            self._copied.record(self._stream)
        compute.wait_event(self._copied)
        if count:
            self._apply(logits, self._arena, self._device_index[0, :count],
                        self._device_index[1, :count])
        self._consumed.record(compute)
