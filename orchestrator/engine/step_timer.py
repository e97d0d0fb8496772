"""Pairs each scheduled engine step with its own answer, to time it.

A step's latency runs from the end of `schedule()` to the start of `update_from_output()` for the
same scheduler output. With async scheduling vLLM keeps two steps in flight, and an output may be
dropped without an answer (an engine error, a step with nothing scheduled), so pairing by arrival
order (first in, first out) can give one step another's latency; pairing by the output object
cannot.
"""

from __future__ import annotations

import collections
from typing import Any

MAX_PENDING_STEPS = 8
"""Steps scheduled and not yet answered that are remembered (vLLM keeps at most two in flight)."""


class StepTimer:
    def __init__(self, max_pending: int = MAX_PENDING_STEPS) -> None:
        self.max_pending = max_pending
        self._pending: collections.OrderedDict[int, tuple[float, Any]] = collections.OrderedDict()

    def scheduled(self, output: object, record: Any, now_s: float) -> None:
        """`output` was scheduled at `now_s`; `record` is what to hand back with its latency."""
        self._pending[id(output)] = (now_s, record)
        while len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)

    def answered(self, output: object, now_s: float) -> tuple[Any, float] | None:
        """(record, latency in ms) of the step `output` belongs to; None if it is not pending."""
        entry = self._pending.pop(id(output), None)
        if entry is None:
            return None
        scheduled_at_s, record = entry
        return record, (now_s - scheduled_at_s) * 1000.0

    def __len__(self) -> int:
        return len(self._pending)
