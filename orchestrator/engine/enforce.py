"""Applying the offline budget to one engine step, exception-safe.

`BudgetEnforcer.apply` is what `ColocateScheduler.schedule` runs before vLLM's own `schedule()`:
it preempts offline work a waiting chat request needs room from, plans the step with
`plan_step`, and changes the scheduler for that one call (offline requests over budget paused,
waiting offline requests held back, the step's token cap lowered). It returns an `undo` that puts
everything back after `schedule()`.

It sees the scheduler only through an access object (`orchestrator.compat.vllm_api.SchedulerAccess`
in the engine, a fake in unit tests), so every change it makes is recorded as it is made: if
anything fails half-way, what was already changed is put back before the error propagates, and no
request is ever lost from the scheduler's queues.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from orchestrator.engine.order import prefix_sharing_order
from orchestrator.engine.plan import OfflineCandidate, StepPlan, plan_step
from orchestrator.request_class import RequestClass, vllm_priority

OFFLINE_PRIORITY = vllm_priority(RequestClass.OFFLINE)


class SchedulerView(Protocol):
    """What enforcement needs from a scheduler (see `SchedulerAccess` for the vLLM one)."""

    chunk_limit: int
    max_num_seqs: int
    block_size: int
    current_step: int

    def running(self) -> list: ...
    def set_running(self, requests: list) -> None: ...
    def waiting(self) -> list: ...
    def hold_waiting(self, requests: list) -> None: ...
    def release_waiting(self, requests: list) -> None: ...
    def in_waiting(self, request) -> bool: ...
    def step_token_cap(self) -> int: ...
    def set_step_token_cap(self, num_tokens: int) -> None: ...
    def defer_decode(self, request, until_step: int) -> int: ...
    def restore_decode(self, request, step: int) -> None: ...
    def num_free_blocks(self) -> int: ...
    def preempt(self, request, now_s: float) -> None: ...
    def priority(self, request) -> int: ...
    def arrival_time_s(self, request) -> float: ...
    def context_tokens(self, request) -> int: ...
    def is_prefilling(self, request) -> bool: ...
    def tokens_to_schedule(self, request, chunk_limit: int) -> int: ...
    def tokens_to_admit(self, request) -> int: ...
    def prompt_token_ids(self, request) -> Sequence[int]: ...


@dataclass(frozen=True)
class StepCounts:
    """What the engine held when the step was planned (published to the channel's counters)."""

    num_online_running: int
    num_online_waiting: int
    num_offline_running: int
    num_offline_waiting: int
    num_offline_paused: int
    online_context_tokens: int
    offline_context_tokens: int
    throttled: bool
    idle: bool
    """Nothing may run this step (all offline work paused and no online work)."""


class _Undo:
    """Changes made to the scheduler, each recorded right after it is made, undone in reverse."""

    def __init__(self) -> None:
        self._steps: list[tuple[Callable[[], None], bool]] = []

    def add(self, step: Callable[[], None], rollback_only: bool = False) -> None:
        self._steps.append((step, rollback_only))

    def rollback(self) -> None:
        """Undo everything (the step was never scheduled)."""
        self._run(everything=True)

    def __call__(self) -> None:
        """Undo the per-step changes after vLLM's schedule() ran with them."""
        self._run(everything=False)

    def _run(self, everything: bool) -> None:
        errors = []
        while self._steps:
            step, rollback_only = self._steps.pop()
            if rollback_only and not everything:
                continue
            try:
                step()
            except Exception as err:  # noqa: BLE001 - undo everything we can, then report
                errors.append(err)
        if errors:
            raise errors[0]


class BudgetEnforcer:
    def __init__(self, view: SchedulerView, clock: Callable[[], float] = time.monotonic,
                 offline_policy: str = "fcfs", max_wait_s: float = 100.0,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.view = view
        self.clock = clock
        self.offline_policy = offline_policy
        """How waiting offline work is admitted: by (priority, arrival) while chat is in the
        engine and by arrival without (`fcfs`, `short_first_under_chat`: the levels differ), or
        grouped by shared prompt prefix (`prefix_sharing`, `order.prefix_sharing_order`)."""
        self.max_wait_s = max_wait_s
        self.wall_clock = wall_clock  # arrival times are the front end's time.time()

    def offline_admission_order(self, waiting: list, num_online: int) -> list:
        v = self.view
        if self.offline_policy == "prefix_sharing":
            order = prefix_sharing_order([v.prompt_token_ids(r) for r in waiting],
                                         [v.arrival_time_s(r) for r in waiting], self.wall_clock(), self.max_wait_s)
            return [waiting[i] for i in order]
        # Waiting offline work is admitted in priority order (its level: predicted length,
        # shortest first, when the replica orders by length) while chat is in the engine, so
        # the slots it takes free up before the next burst; with no chat, by arrival, so the
        # long ones run in the lulls. (With FCFS every level is 0: the same order.)
        return sorted(waiting, key=(lambda r: (v.priority(r), v.arrival_time_s(r))) if num_online
                      else v.arrival_time_s)

    def is_offline(self, request) -> bool:
        return self.view.priority(request) >= OFFLINE_PRIORITY

    def make_room_for_waiting_chat(self) -> int:
        """Paused offline requests keep their KV cache and sequence slot while memory allows. When
        a waiting chat request does not fit in the free blocks or finds every slot (max_num_seqs)
        taken, vLLM would leave it waiting (it preempts only for running requests), so offline
        requests are preempted here, newest first, until it fits; online requests never are.
        Preemption is not undone: the request is back in vLLM's waiting queue, which is where
        vLLM itself puts a preempted request. Returns how many were preempted."""
        v = self.view
        waiting_online = [r for r in v.waiting() if not self.is_offline(r)]
        if not waiting_online:
            return 0
        need = sum(-(-v.tokens_to_admit(r) // v.block_size) + 1 for r in waiting_online)
        victims = sorted((r for r in v.running() if self.is_offline(r)), key=v.arrival_time_s, reverse=True)
        now = self.clock()
        num = 0
        for victim in victims:
            slots_free = v.max_num_seqs - len(v.running())
            if v.num_free_blocks() >= need and slots_free >= len(waiting_online):
                break
            v.preempt(victim, now)
            num += 1
        return num

    def apply(self, budget_at: Callable[[int], tuple[int, int]]) -> tuple[Callable[[], None], StepPlan, StepCounts]:
        """Plan this step under the budget (`budget_at(num_online) -> (max seqs, max tokens)`) and
        change the scheduler accordingly. Returns (undo, plan, counts). On any error, whatever was
        changed is undone before the error propagates."""
        v = self.view
        undo = _Undo()
        try:
            self.make_room_for_waiting_chat()
            running = v.running()
            online_running = [r for r in running if not self.is_offline(r)]
            offline_running = sorted((r for r in running if self.is_offline(r)), key=v.arrival_time_s)
            waiting = v.waiting()
            online_waiting = [r for r in waiting if not self.is_offline(r)]
            num_online = len(online_running) + len(online_waiting)
            offline_waiting = self.offline_admission_order([r for r in waiting if self.is_offline(r)], num_online)
            max_seqs, max_tokens = budget_at(num_online)
            limit = v.chunk_limit
            plan = plan_step(
                online_tokens=sum(v.tokens_to_schedule(r, limit) for r in online_running + online_waiting),
                num_online_waiting=len(online_waiting),
                num_online_prefilling=sum(1 for r in online_running if v.is_prefilling(r)),
                offline_running=[OfflineCandidate(v.tokens_to_schedule(r, limit), v.is_prefilling(r))
                                 for r in offline_running],
                num_offline_waiting=len(offline_waiting),
                max_offline_seqs=max_seqs, max_offline_tokens=max_tokens,
                max_step_tokens=v.step_token_cap(),
            )
            run = set(plan.run)
            paused = [r for i, r in enumerate(offline_running) if i not in run]
            # vLLM schedules running requests in list order: online first, then the offline ones
            # we chose (oldest first). The same requests, reordered: nothing is added or dropped.
            v.set_running(online_running + offline_running)
            # Rolled back only on failure: after vLLM's schedule() the list is vLLM's own again.
            undo.add(lambda: v.set_running(running), rollback_only=True)
            for r in paused:
                old = v.defer_decode(r, v.current_step + 2)
                undo.add(lambda r=r, old=old: v.restore_decode(r, old))
            held = offline_waiting[plan.num_waiting_admitted:]
            if held:
                # Registered first: a removal that fails half-way must still give back what it took.
                undo.add(lambda: v.release_waiting([r for r in held if not v.in_waiting(r)]))
                v.hold_waiting(held)
            cap = v.step_token_cap()
            v.set_step_token_cap(plan.token_cap)
            undo.add(lambda: v.set_step_token_cap(cap))
        except BaseException:
            undo.rollback()
            raise
        counts = StepCounts(
            num_online_running=len(online_running), num_online_waiting=len(online_waiting),
            num_offline_running=len(offline_running) - len(paused), num_offline_waiting=len(offline_waiting),
            num_offline_paused=len(paused),
            online_context_tokens=sum(v.context_tokens(r) for r in online_running),
            offline_context_tokens=sum(v.context_tokens(r) for r in offline_running),
            throttled=plan.throttled(len(offline_running), len(offline_waiting)),
            idle=plan.token_cap == 0,
        )
        return undo, plan, counts


def counts_as_counters(counts: StepCounts) -> dict[str, Any]:
    return {k: getattr(counts, k) for k in (
        "num_online_running", "num_online_waiting", "num_offline_running", "num_offline_waiting",
        "num_offline_paused", "online_context_tokens", "offline_context_tokens")}
