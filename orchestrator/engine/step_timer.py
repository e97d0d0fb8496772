"""Pairs each scheduled engine step with its own answer, to time it.

A step's latency runs from the end of `schedule()` to the start of `update_from_output()` for the
same scheduler output. With async scheduling vLLM keeps two steps in flight, and an output may be
dropped without an answer (an engine error, a step with nothing scheduled), so pairing by arrival
order (first in, first out) can give one step another's latency; pairing by the output object
cannot.

A step's cycle is what a request in it waited for its token: from the previous step's answer if
the engine had unfinished requests then (it went on without waiting for work), else from the
start of this step's `schedule()`. It adds to the step the host's time between steps (scheduling,
the budget's enforcement, output processing): measured on the emulated A100 stack on 2 cores,
cycle / step 1.08 at the median with under 8 sequences and 1.26-1.30 with 64-200 (p90 1.46-1.62),
the part of TPOT that the step alone leaves out.
"""

from __future__ import annotations

import collections
from typing import Any

MAX_PENDING_STEPS = 8
"""Steps scheduled and not yet answered that are remembered (vLLM keeps at most two in flight)."""


class StepTimer:
    def __init__(self, max_pending: int = MAX_PENDING_STEPS) -> None:
        self.max_pending = max_pending
        self._pending: collections.OrderedDict[int, tuple[float, float, Any]] = collections.OrderedDict()
        self._last_answer_s: float | None = None
        self._busy = False

    def scheduled(self, output: object, record: Any, now_s: float, started_s: float | None = None) -> None:
        """`output` was scheduled at `now_s` by a `schedule()` call that began at `started_s`
        (default `now_s`); `record` is what to hand back with its latency."""
        self._pending[id(output)] = (now_s, now_s if started_s is None else started_s, record)
        while len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)

    def answered(self, output: object, now_s: float) -> tuple[Any, float, float] | None:
        """(record, latency in ms, cycle in ms) of the step `output` belongs to; None if it is
        not pending."""
        entry = self._pending.pop(id(output), None)
        if entry is None:
            return None
        scheduled_at_s, started_s, record = entry
        # Busy: from the previous answer (async scheduling began this step before it; sync
        # scheduling after it, the gap being host work). Idle before: from this schedule().
        busy = self._busy and self._last_answer_s is not None
        begin_s = self._last_answer_s if busy else started_s
        self._last_answer_s = now_s
        return record, (now_s - scheduled_at_s) * 1000.0, (now_s - begin_s) * 1000.0

    def updated(self, busy: bool) -> None:
        """After an answer's update: whether the engine still had unfinished requests (its next
        step follows without waiting for work, so that step's cycle starts at this answer)."""
        self._busy = busy

    def __len__(self) -> int:
        return len(self._pending)
