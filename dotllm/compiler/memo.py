"""A bounded, thread-safe memo: what a request's constraint was found to be, by key.

Clients send the same constraint over and over (an application's schema, a tool's
parameters), and the cheap checks a request pays before any index is looked up (schema
normalization, enforcement, llguidance's grammar check: ~0.5 ms for a Glaiveai2K schema in
the API server on the CI machine's CPU) give the same answer each time. Least recently
used out first once the entries' costs (a count, or the bytes a key stands for) pass the
bound, so that many large schemas cannot grow a server's memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

MISSING = object()


class Memo:
    def __init__(self, max_cost: int):
        self.max_cost = max_cost
        self._entries: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._cost = 0
        self._lock = threading.Lock()

    def get(self, key) -> Any:
        """The value kept for `key`, or MISSING."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return MISSING
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key, value, cost: int = 1) -> None:
        if cost > self.max_cost:
            return
        with self._lock:
            if (old := self._entries.pop(key, None)) is not None:
                self._cost -= old[1]
            self._entries[key] = (value, cost)
            self._cost += cost
            while self._cost > self.max_cost:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._cost -= dropped

    def __len__(self) -> int:
        return len(self._entries)
