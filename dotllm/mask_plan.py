"""Which mask rows a step sends, and how (engine core; the workers' `MaskArena` obeys).

A row of a compiled index's per-state table is sent as the arena slot that holds it: the
table's rows are uploaded to every worker the first time a step needs one of them, into
slots this planner hands out, and stay there until the slots are needed for another
table (least recently used first, never one the same step uses). A table wider than the
arena can hold, or a row no table holds (llguidance's), travels with the step.

With device states on (`blob_words`), a request on an index may instead be named by a
state slot: its index's transitions go to the workers once (a blob, dotllm.kernels.states,
kept while its table is), the slot is set from the host's state once, and from then on
the device moves it by each sampled token, so the host need not have accepted the last
token before it plans the next step. A table that live device states use is never
evicted; `release` frees a request's slot when it ends or leaves the index.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

import numpy as np

from dotllm.compiler.compiled import CompiledIndex, CorruptEntry
from dotllm.compiler.mask_table import MaskTable
from dotllm.kernels import states as device_states
from dotllm.kernels.arena import DEVICE_STATE, UNCONSTRAINED, RowPlan, direct_slot

# Where at most this share of a step's constrained rows needs the host (an llguidance row,
# a request the device does not hold), those requests sit every other step out rather
# than make every step of the batch wait for the host (`device_states`).
SIT_OUT_SHARE = 0.2
# Bytes of tables and transitions a step sends at most (a table alone may exceed it).
# What a step carries reaches the workers with it, on the step's critical path, and vLLM's
# shared-memory broadcast takes 16 MiB a message (VLLM_MQ_MAX_CHUNK_BYTES_MB; more goes
# over a socket). Without a bound, 64 real schemas arriving warm at once sent ~600 MB
# in their first step (Github_easy's transitions are up to 345 MB an index) and every
# request's first token waited ~1.2 s on an H200. A blob goes in pieces over as many
# steps as it needs; its requests use table rows until it is whole. A blob of more than
# BLOB_STEPS steps' share is never sent: it would hold back every other index's for as
# many steps (its requests use table rows, as where the device has no room for it).
STEP_UPLOAD_BYTES = 8 * 2**20
BLOB_STEPS = 4


class RowPlanner:
    def __init__(self, words: int, table_slots: int, max_rows: int, blob_words: int = 0,
                 state_slots: int = 0, step_upload_bytes: int = STEP_UPLOAD_BYTES):
        self.words = words
        self.step_upload_bytes = step_upload_bytes
        self.table_slots = table_slots
        self._free = list(range(table_slots - 1, -1, -1))  # pop() hands out the lowest
        self._resident: OrderedDict[int, np.ndarray] = OrderedDict()  # serial -> slots, LRU
        self._direct = np.empty((max_rows, words), dtype=np.int32)
        # Device states (0 words: off): blobs by first fit in [0, blob_words).
        self.blob_words = blob_words
        self._blob_free: list[tuple[int, int]] = [(0, blob_words)] if blob_words else []
        self._blobs: dict[int, tuple[int, int]] = {}  # serial -> (offset, length)
        self._unsent: dict[int, tuple[np.ndarray, int]] = {}  # serial -> (blob, words sent)
        self._state_free = list(range(state_slots - 1, -1, -1))
        # request id -> (state slot, serial). A request's guide stays on that index while
        # it is here (its blocks were checked whole before the blob went, and a hand-over
        # goes only to an index); EOS releases it (`DotllmGrammar`'s on_eos).
        self.owners: dict[str, tuple[int, int]] = {}
        self._pins: Counter[int] = Counter()  # serial -> live device states on it
        # The requests of the last plan whose rows the host gave, where it also had rows
        # named by device states and few such others (empty otherwise): they sit out the
        # steps they would make wait for the host (the `device_states` patch).
        self.need_host: frozenset[str] = frozenset()
        # The requests whose rows the last plan named by device states: the device moves
        # them by the tokens that step samples (`moved_on_device`).
        self._last_on_device: frozenset[str] = frozenset()
        # The last plan named every row by a device state the device held already, and
        # sent nothing else: the next step's plan for the same requests is the same, unless
        # `changes` moved since (a device state set or released, a table evicted).
        self.last_plan_on_device = False
        self.changes = 0

    @property
    def device_states(self) -> bool:
        return self.blob_words > 0

    def start(self) -> PlanBuilder:
        return PlanBuilder(self)

    def holds(self, request_id: str, table: MaskTable) -> bool:
        """Whether the device holds the request's state on `table` (its live state)."""
        owner = self.owners.get(request_id)
        return owner is not None and owner[1] == table.serial

    def moved_on_device(self, request_ids) -> set[str]:
        """Those of `request_ids` the last plan named by a device state the device still
        holds: the token that step samples moves them on the device, and they stay on
        their index (it was checked whole before it went there: no corrupt block sends
        them to llguidance). A set operation, not a call a request: the scheduler asks
        for its whole batch every step."""
        return self._last_on_device & request_ids & self.owners.keys()

    def release(self, request_id: str) -> None:
        """The request's device state is no longer wanted (it ended, or left the index)."""
        if (owner := self.owners.pop(request_id, None)) is not None:
            self.changes += 1
            slot, serial = owner
            self._state_free.append(slot)
            self._pins[serial] -= 1
            if not self._pins[serial]:
                del self._pins[serial]

    def release_all(self) -> None:
        """Forget every device state (vLLM dropped tokens the device may have taken)."""
        for request_id in list(self.owners):
            self.release(request_id)

    def _evict(self, in_use: set[int], with_blob: bool = False) -> bool:
        """Free the least recently used table no step or device state uses (one with a
        blob, if `with_blob`); False if there is none."""
        victim = next((s for s in self._resident if s not in in_use and s not in self._pins
                       and (not with_blob or s in self._blobs)), None)
        if victim is None:
            return False
        self.changes += 1
        self._free.extend(self._resident.pop(victim)[::-1].tolist())
        self._unsent.pop(victim, None)
        if (blob := self._blobs.pop(victim, None)) is not None:
            self._blob_free.append(blob)
            self._blob_free.sort()
            merged: list[tuple[int, int]] = []
            for start, length in self._blob_free:
                if merged and merged[-1][0] + merged[-1][1] == start:
                    merged[-1] = (merged[-1][0], merged[-1][1] + length)
                else:
                    merged.append((start, length))
            self._blob_free = merged
        return True

    def _place(self, table: MaskTable, in_use: set[int]) -> np.ndarray | None:
        """The table's slots, after evicting what it takes; None if it cannot fit."""
        need = len(table.rows)
        if need > self.table_slots:
            return None
        while len(self._free) < need:
            if not self._evict(in_use):
                return None
        self._free.sort(reverse=True)  # the lowest slots first keeps the arena small
        slots = np.array([self._free.pop() for _ in range(need)], dtype=np.int32)
        self._resident[table.serial] = slots
        return slots

    def _place_blob(self, compiled: CompiledIndex, slots: np.ndarray, in_use: set[int]
                    ) -> int | None:
        """The offset of the index's blob, after evicting what it takes (the blob, built,
        waits in `_unsent` until every piece of it is sent); None if it cannot be there."""
        serial = compiled.table.serial
        if (placed := self._blobs.get(serial)) is not None:
            return placed[0]
        t = compiled.transitions
        need = device_states.HEADER + 2 * t.num_states + 1 + 2 * len(t.tokens)
        if need > self.blob_words or need * 4 > BLOB_STEPS * self.step_upload_bytes:
            return None
        try:
            compiled.check_all()  # the device reaches states the host has not checked
        except CorruptEntry:
            return None
        while (start := next((i for i, (_, n) in enumerate(self._blob_free) if n >= need),
                             None)) is None:
            if not self._evict(in_use | {serial}, with_blob=True):
                return None
        offset, length = self._blob_free[start]
        if length == need:
            del self._blob_free[start]
        else:
            self._blob_free[start] = (offset + need, length - need)
        self._blobs[serial] = (offset, need)
        self._unsent[serial] = (device_states.blob(t.offsets, t.tokens, t.targets,
                                                   slots[compiled.table.state_rows]), 0)
        return offset


class PlanBuilder:
    """One step's plan, row by row in vLLM's order."""

    def __init__(self, planner: RowPlanner):
        self._planner = planner
        self._slots: list[int] = []  # a row's slot (or what stands for one), row by row
        self._direct = 0
        self._uploads: list[tuple[np.ndarray, np.ndarray]] = []
        self._in_use: set[int] = set()
        self._device_rows: list[int] = []  # rows named by a device state ...
        self._device_slots: list[int] = []  # ... their state slots ...
        self._device_requests: list[str] = []  # ... and their requests
        self._host_requests: list[str] = []  # requests whose rows the host gave
        self._inits: list[tuple[int, int, int]] = []  # (state slot, blob base, state)
        self._blob_uploads: list[tuple[int, np.ndarray]] = []
        self._room = planner.step_upload_bytes  # bytes this step may still send

    def _add(self, slot: int) -> None:
        self._slots.append(slot)

    def unconstrained(self) -> None:
        self._add(UNCONSTRAINED)

    def _table_slots(self, table: MaskTable) -> np.ndarray | None:
        """Where the workers hold `table` (uploading it with this step if new); None if
        it cannot be held."""
        planner = self._planner
        if table.rows.shape[1] != planner.words:  # a vocabulary padded otherwise
            return None
        slots = planner._resident.get(table.serial)
        if slots is None:
            if table.rows.nbytes > self._room and self._room < planner.step_upload_bytes:
                return None  # a later step sends it
            slots = planner._place(table, self._in_use)
            if slots is None:
                return None
            self._uploads.append((slots, table.rows))
            self._room = max(0, self._room - table.rows.nbytes)
        else:
            planner._resident.move_to_end(table.serial)
        self._in_use.add(table.serial)
        return slots

    def table_row(self, table: MaskTable, row: int) -> None:
        slots = self._table_slots(table)
        if slots is not None:
            self._add(int(slots[row]))
            return
        out = self.direct_row()
        n = min(table.rows.shape[1], len(out))
        out[:n] = table.rows[row, :n]
        out[n:] = 0

    def device_state_row(self, request_id: str, compiled: CompiledIndex,
                         state: int | None) -> bool:
        """The request's row named by its device state on `compiled`: the one the device
        holds (`RowPlanner.holds`), else a new one set to `state` (the host's, in step
        with every token sampled; None: not in step). False, planning nothing, where it
        cannot be."""
        planner = self._planner
        table = compiled.table
        owner = planner.owners.get(request_id)
        if owner is not None:
            if owner[1] == table.serial:  # the common case: its table is pinned there
                self.held_rows([request_id])
                return True
            planner.release(request_id)  # it moved to another index
        if state is None or not planner._state_free:
            return False
        if (slots := self._table_slots(table)) is None:
            return False
        if (base := planner._place_blob(compiled, slots, self._in_use)) is None:
            return False
        if not self._send_blob(table.serial, base):
            return False
        slot = planner._state_free.pop()
        planner.changes += 1
        planner.owners[request_id] = (slot, table.serial)
        planner._pins[table.serial] += 1
        self._inits.append((slot, base, state))
        self._device_rows.append(len(self._slots))
        self._device_slots.append(slot)
        self._device_requests.append(request_id)
        self._add(DEVICE_STATE)
        return True

    @property
    def planner(self) -> RowPlanner:
        return self._planner

    def held_rows(self, request_ids: list[str]) -> None:
        """The rows of requests whose device states the device holds, in this order (one
        call for a run of them: a batch in decode is nearly all such requests)."""
        owners = self._planner.owners
        first = len(self._slots)
        self._device_rows.extend(range(first, first + len(request_ids)))
        self._device_slots.extend([owners[r][0] for r in request_ids])
        self._device_requests.extend(request_ids)
        self._slots.extend([DEVICE_STATE] * len(request_ids))

    def on_host(self, request_id: str) -> None:
        """The request's rows in this plan are the host's (not a device state's)."""
        self._host_requests.append(request_id)

    def _send_blob(self, serial: int, base: int) -> bool:
        """Sends what this step may of the blob at `base`; whether it is all sent now."""
        unsent = self._planner._unsent
        if serial not in unsent:
            return True
        blob, sent = unsent[serial]
        n = min(len(blob) - sent, self._room // blob.itemsize)
        if n > 0:
            self._blob_uploads.append((base + sent, blob[sent:sent + n]))
            self._room -= n * blob.itemsize
            sent += n
        if sent < len(blob):
            unsent[serial] = (blob, sent)
            return False
        del unsent[serial]
        return True

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
        held = len(self._device_rows)
        others = len(self._slots) - held - self._slots.count(UNCONSTRAINED)
        few = 0 < others <= SIT_OUT_SHARE * held
        p.need_host = frozenset(self._host_requests) if few else frozenset()
        p._last_on_device = frozenset(self._device_requests)
        plan = RowPlan(p.words, np.array(self._slots, dtype=np.int32),
                       p._direct[:self._direct], self._uploads,
                       blob_uploads=self._blob_uploads)
        if self._device_rows:
            plan.states = np.full(len(self._slots), -1, dtype=np.int32)
            plan.states[self._device_rows] = self._device_slots
        if self._inits:
            columns = zip(*self._inits, strict=True)
            plan.state_inits = tuple(np.array(c, dtype=np.int32) for c in columns)
        p.last_plan_on_device = held == len(self._slots) and not plan.writes_device
        return plan
