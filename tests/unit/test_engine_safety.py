"""Engine-side safety, without vLLM: enforcement undoes its changes when it fails half-way, steps
are timed against their own answers, and a half-written budget table is never applied."""

from __future__ import annotations

import pytest

from orchestrator.engine.budget import OfflineBudget
from orchestrator.engine.channel import _BUDGET_SEQ, _SEQS_TABLE, EngineChannel
from orchestrator.engine.enforce import OFFLINE_PRIORITY, BudgetEnforcer
from orchestrator.engine.step_timer import StepTimer


class Req:
    def __init__(self, name, offline, computed=10, prompt=10, total=11, arrival=0.0):
        self.name, self.priority = name, OFFLINE_PRIORITY if offline else 0
        self.computed, self.prompt, self.total, self.arrival = computed, prompt, total, arrival
        self.eligible = 0

    def __repr__(self):
        return self.name


class FakeView:
    """The scheduler as enforcement sees it; `fail_on` names a method that raises."""

    chunk_limit = 512
    max_num_seqs = 16
    block_size = 16
    current_step = 5

    def __init__(self, running, waiting, fail_on=None):
        self._running, self._waiting, self.fail_on = list(running), list(waiting), fail_on
        self.cap = 256

    def _maybe_fail(self, name):
        if self.fail_on == name:
            raise RuntimeError(f"{name} failed")

    def running(self):
        return list(self._running)

    def set_running(self, requests):
        self._running = list(requests)

    def waiting(self):
        return list(self._waiting)

    def hold_waiting(self, requests):
        for r in requests:
            self._waiting.remove(r)
        self._maybe_fail("hold_waiting")

    def release_waiting(self, requests):
        self._waiting.extend(requests)

    def in_waiting(self, r):
        return r in self._waiting

    def step_token_cap(self):
        return self.cap

    def set_step_token_cap(self, n):
        self._maybe_fail("set_step_token_cap")
        self.cap = n

    def defer_decode(self, r, until):
        old, r.eligible = r.eligible, until
        return old

    def restore_decode(self, r, step):
        r.eligible = step

    def num_free_blocks(self):
        return 1000

    def preempt(self, r, now):
        self._running.remove(r)
        self._waiting.append(r)

    def priority(self, r):
        return r.priority

    def arrival_time_s(self, r):
        return r.arrival

    def context_tokens(self, r):
        return r.computed

    def is_prefilling(self, r):
        return r.computed < r.prompt

    def tokens_to_schedule(self, r, limit):
        return min(limit, r.total - r.computed)

    def tokens_to_admit(self, r):
        return r.total - r.computed


def _state(view):
    return sorted(map(repr, view._running)), sorted(map(repr, view._waiting)), view.cap, {
        repr(r): r.eligible for r in view._running + view._waiting}


@pytest.mark.parametrize("fail_on", ["hold_waiting", "set_step_token_cap"])
def test_enforcement_that_fails_half_way_loses_no_request_and_undoes_every_change(fail_on):
    running = [Req(f"off{i}", True, arrival=i) for i in range(4)] + [Req("chat", False)]
    waiting = [Req(f"wait{i}", True, computed=0, prompt=50, total=50, arrival=10 + i) for i in range(3)]
    view = FakeView(running, waiting, fail_on=fail_on)
    before = _state(view)
    with pytest.raises(RuntimeError, match=fail_on):
        BudgetEnforcer(view).apply(lambda num_online: (1, 64))
    assert _state(view) == before


def test_enforcement_pauses_over_budget_and_its_undo_restores_what_schedule_must_not_keep():
    running = [Req(f"off{i}", True, arrival=i) for i in range(4)] + [Req("chat", False)]
    waiting = [Req(f"wait{i}", True, computed=0, prompt=50, total=50, arrival=10 + i) for i in range(3)]
    view = FakeView(running, waiting)
    undo, plan, counts = BudgetEnforcer(view).apply(lambda num_online: (2, 64))
    assert counts.num_offline_paused == 2 and counts.num_online_running == 1
    assert [r.eligible for r in running[2:4]] == [7, 7]  # paused: not eligible for this step
    assert len(view._waiting) == 0 and view.cap == plan.token_cap  # waiting offline held back
    undo()
    assert sorted(map(repr, view._waiting)) == ["wait0", "wait1", "wait2"]
    assert view.cap == 256 and [r.eligible for r in running] == [0] * 5


def test_steps_are_timed_against_their_own_answer_not_the_first_pending():
    timer = StepTimer()
    a, b = object(), object()
    timer.scheduled(a, "step a", 0.0)
    timer.scheduled(b, "step b", 0.010)
    # Async scheduling: b's answer may come while a's never does (or comes later).
    assert timer.answered(b, 0.030) == ("step b", pytest.approx(20.0))
    assert timer.answered(a, 0.050) == ("step a", pytest.approx(50.0))
    assert timer.answered(a, 0.060) is None
    outputs = [object() for _ in range(20)]  # kept alive: ids of live objects are distinct
    for i, out in enumerate(outputs):
        timer.scheduled(out, i, float(i))
    assert len(timer) == timer.max_pending


def test_a_half_written_budget_table_is_never_applied(tmp_path):
    chan = EngineChannel.create(tmp_path / "chan", fallback=OfflineBudget.flat(1, 64))
    chan.write_budget(OfflineBudget((8, 4), (512, 128)), valid_for_s=60.0, now_s=0.0)
    assert chan.budget_at(1, 1.0) == (4, 128, False)
    # A writer stopped in the middle of a write: the sequence is odd and half the table is new.
    chan.header[_BUDGET_SEQ] += 1
    chan.header[_SEQS_TABLE + 1] = 30
    assert chan.budget_at(1, 1.0) == (1, 64, True)
    chan.header[_BUDGET_SEQ] += 1  # the write completes
    assert chan.budget_at(1, 1.0) == (30, 128, False)
    assert chan.budget_seq() == 2
    chan.close(unlink=True)
