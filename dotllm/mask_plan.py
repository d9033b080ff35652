"""Which mask rows a step sends, and how (engine core; the workers' `MaskArena` obeys).

A row of a compiled index's per-state table is sent as the arena slot that holds it: the
table's rows are uploaded to every worker the first time a step needs one of them, into
slots this planner hands out, and stay there until the slots are needed for another
table (least recently used first, never one the same step uses). A table wider than the
arena can hold, or a row no table holds (llguidance's), travels with the step.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from dotllm.compiler.mask_table import MaskTable
from dotllm.kernels.arena import UNCONSTRAINED, RowPlan, direct_slot


class RowPlanner:
    def __init__(self, words: int, table_slots: int, max_rows: int):
        self.words = words
        self.table_slots = table_slots
        self._free = list(range(table_slots - 1, -1, -1))  # pop() hands out the lowest
        self._resident: OrderedDict[int, np.ndarray] = OrderedDict()  # serial -> slots, LRU
        self._direct = np.empty((max_rows, words), dtype=np.int32)
        self._slots = np.empty(max_rows, dtype=np.int32)

    def start(self) -> PlanBuilder:
        return PlanBuilder(self)

    def _place(self, table: MaskTable, in_use: set[int]) -> np.ndarray | None:
        """The table's slots, after evicting what it takes; None if it cannot fit."""
        need = len(table.rows)
        if need > self.table_slots:
            return None
        while len(self._free) < need:
            victim = next((s for s in self._resident if s not in in_use), None)
            if victim is None:
                return None
            self._free.extend(self._resident.pop(victim)[::-1].tolist())
        self._free.sort(reverse=True)  # the lowest slots first keeps the arena small
        slots = np.array([self._free.pop() for _ in range(need)], dtype=np.int32)
        self._resident[table.serial] = slots
        return slots


class PlanBuilder:
    """One step's plan, row by row in vLLM's order."""

    def __init__(self, planner: RowPlanner):
        self._planner = planner
        self._count = 0
        self._direct = 0
        self._uploads: list[tuple[np.ndarray, np.ndarray]] = []
        self._in_use: set[int] = set()

    def _add(self, slot: int) -> None:
        self._planner._slots[self._count] = slot
        self._count += 1

    def unconstrained(self) -> None:
        self._add(UNCONSTRAINED)

    def table_row(self, table: MaskTable, row: int) -> None:
        planner = self._planner
        if table.rows.shape[1] != planner.words:  # a vocabulary padded otherwise
            self.direct_row()[:] = 0
            n = min(table.rows.shape[1], planner.words)
            planner._direct[self._direct - 1, :n] = table.rows[row, :n]
            return
        slots = planner._resident.get(table.serial)
        if slots is None:
            slots = planner._place(table, self._in_use)
            if slots is None:
                self.direct_row()[:] = table.rows[row]
                return
            self._uploads.append((slots, table.rows))
        else:
            planner._resident.move_to_end(table.serial)
        self._in_use.add(table.serial)
        self._add(int(slots[row]))

    @property
    def rows(self) -> np.ndarray:
        """The step's own rows (C-contiguous int32 [max_rows, words])."""
        return self._planner._direct

    def direct_index(self) -> int:
        """A row of this step's own to fill: its index in `rows`."""
        j = self._direct
        self._add(direct_slot(j))
        self._direct += 1
        return j

    def direct_row(self) -> np.ndarray:
        """A row of this step's own to fill (int32 [words])."""
        return self._planner._direct[self.direct_index()]

    def finish(self) -> RowPlan:
        p = self._planner
        return RowPlan(p.words, p._slots[:self._count].copy(), p._direct[:self._direct],
                       self._uploads)
