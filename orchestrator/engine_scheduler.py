"""In-engine enforcement of the offline budget, at every step.

`ColocateScheduler` is vLLM's scheduler (with step telemetry) that, before each step, reads the
offline budget from the engine channel for the current number of online requests and plans the
step with `plan_step`, a pure function:

- online requests are planned first: their tokens are reserved before any offline work;
- running offline requests beyond the budget are *paused*: they stay in vLLM's running list with
  their KV cache, but are not scheduled this step. Because they stay in that list, vLLM's
  priority preemption still finds them first when memory runs out (offline requests carry a
  lower priority), so offline work is preempted, never online;
- while an online request waits to be admitted or has prompt left to prefill, offline work sits
  the step out (paused, not discarded), so a burst of chat gets its prefill in the very next
  step, in steps of its own: on a CPU a prefill step beside a full offline decode batch added
  hundreds of ms to TTFT;
- a waiting online request that finds no free KV blocks or sequence slot (paused requests hold
  both) gets them by preempting offline requests, newest first;
- waiting offline requests are admitted only up to the budget's free sequences.

If the controller stops refreshing the budget, the channel hands out the safe fallback budget.
Any error in this path is logged and the step runs unplanned: enforcement must never take the
engine down.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.request_class import RequestClass, vllm_priority
from profiler.telemetry import TelemetryScheduler

log = logging.getLogger(__name__)

_OFFLINE_PRIORITY = vllm_priority(RequestClass.OFFLINE)


@dataclass(frozen=True)
class OfflineCandidate:
    """A running offline request as the planner sees it: the tokens it would take this step."""

    num_new_tokens: int
    is_prefill: bool


@dataclass(frozen=True)
class StepPlan:
    run: tuple[int, ...]
    """Indices (into the given offline running requests) scheduled this step; the rest pause."""
    num_waiting_admitted: int
    """How many waiting offline requests (in priority order) may be admitted."""
    token_cap: int
    """Total tokens this step may schedule (online reserved plus the offline allowance)."""
    num_offline_tokens: int

    def throttled(self, num_offline_running: int, num_offline_waiting: int) -> bool:
        return len(self.run) < num_offline_running or self.num_waiting_admitted < num_offline_waiting


def plan_step(*, online_tokens: int, num_online_waiting: int, offline_running: Sequence[OfflineCandidate],
              num_offline_waiting: int, max_offline_seqs: int, max_offline_tokens: int,
              max_step_tokens: int, num_online_prefilling: int = 0) -> StepPlan:
    """Which offline work runs in this step, given the online demand and the budget.

    `online_tokens` is what the online requests (running and waiting) would take this step;
    offline requests are listed oldest first, so the oldest finish first. Offline work sits out
    every step that admits a waiting chat request or carries a running one's prefill (a long
    prompt takes several chunks): those steps are the chat's time to first token, and the budget
    tables are sized for steps of chat decodes.
    """
    online = min(online_tokens, max_step_tokens)
    if num_online_waiting > 0 or num_online_prefilling > 0:
        return StepPlan((), 0, online, 0)
    tokens_left = max(0, min(max_offline_tokens, max_step_tokens - online))
    seqs_left = max_offline_seqs
    run: list[int] = []
    used = 0
    for i, cand in enumerate(offline_running):
        if seqs_left <= 0 or tokens_left <= 0:
            break
        need = max(cand.num_new_tokens, 0)
        if cand.is_prefill:
            take = min(need, tokens_left)
        elif need > tokens_left:
            continue
        else:
            take = need
        run.append(i)
        seqs_left -= 1
        tokens_left -= take
        used += take
    admitted = min(num_offline_waiting, seqs_left) if tokens_left > 0 else 0
    cap = online + used + (tokens_left if admitted else 0)
    return StepPlan(tuple(run), admitted, cap, used)


def _prefilling(request) -> bool:
    return request.num_computed_tokens < request.num_prompt_tokens


POLL_SLEEP_ENV = "COLOCATE_ENGINE_POLL_SLEEP_US"


def quiet_engine_polling(sleep_us: float) -> bool:
    """Make this process's waits on vLLM's shared-memory queues sleep `sleep_us` between polls
    instead of spinning on sched_yield.

    vLLM's engine core spins for up to a second after each read while it waits for the model
    worker's output, so an engine stepping without pause holds a whole core on top of the
    worker's. On a GPU node that is one host core of many; on a CPU node where the HTTP proxy,
    the replica and the clients share the same few cores, it starved them: measured on 2 cores
    with offline work running, a plain process's 10 ms sleep overran by up to 0.8 s, and chat
    requests reached the Serve proxy 3-4 s after they were sent. A sleep of a few hundred
    microseconds per poll costs the step about that much and frees the core."""
    if sleep_us <= 0:
        return False
    try:
        from vllm.distributed.device_communicators import shm_broadcast
    except ImportError:  # another vLLM layout: leave its waits alone
        return False
    seconds = sleep_us / 1e6
    shm_broadcast.sched_yield = lambda: time.sleep(seconds)
    return True


class ColocateScheduler(TelemetryScheduler):
    """vLLM's scheduler with step telemetry and the per-step offline budget."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._plan_failed = False
        if quiet_engine_polling(float(os.environ.get(POLL_SLEEP_ENV, "0"))):
            log.info("colocate: engine core polls its worker every %s us instead of spinning",
                     os.environ[POLL_SLEEP_ENV])
        if self.channel is not None:
            self.channel.set_counters(max_num_seqs=self.max_num_running_reqs)
        threshold = self.scheduler_config.long_prefill_token_threshold or 0
        self._chunk_limit = threshold if threshold > 0 else self.max_num_scheduled_tokens

    def _need(self, request) -> int:
        need = request.num_tokens_with_spec + request.num_output_placeholders - request.num_computed_tokens
        return max(0, min(need, self._chunk_limit))

    def schedule(self, *args, **kwargs):
        undo = None
        if self.channel is not None and not self._plan_failed:
            try:
                undo = self._apply_budget()
            except Exception:  # noqa: BLE001 - never take the engine down
                self._plan_failed = True
                log.exception("colocate: offline budget enforcement failed; running unplanned from now on")
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            if undo is not None:
                undo()
        if undo is not None:
            self._count_preempted(output)
        return output

    def _make_room_for_waiting_chat(self) -> None:
        """Paused offline requests keep their KV cache and sequence slot while memory allows. When a
        waiting chat request does not fit in the free blocks or finds every slot (max_num_seqs)
        taken, vLLM would leave it waiting (it preempts only for running requests), so offline
        requests are preempted here, newest first, until it fits; online requests never are."""
        waiting_online = [r for r in self.waiting if r.priority < _OFFLINE_PRIORITY]
        if not waiting_online:
            return
        block = self.block_size
        need = sum(-(-(r.num_tokens - r.num_computed_tokens) // block) + 1 for r in waiting_online)
        pool = self.kv_cache_manager.block_pool
        victims = sorted((r for r in self.running if r.priority >= _OFFLINE_PRIORITY),
                         key=lambda r: r.arrival_time, reverse=True)
        now = time.monotonic()
        for victim in victims:
            # Paused requests also hold sequence slots (max_num_seqs): chat needs both.
            slots_free = self.max_num_running_reqs - len(self.running)
            if pool.get_num_free_blocks() >= need and slots_free >= len(waiting_online):
                break
            self.running.remove(victim)
            self._preempt_request(victim, now)

    def _apply_budget(self):
        chan = self.channel
        self._make_room_for_waiting_chat()
        online_running, offline_running = [], []
        for r in self.running:
            (offline_running if r.priority >= _OFFLINE_PRIORITY else online_running).append(r)
        online_waiting, offline_waiting = [], []
        for r in self.waiting:
            (offline_waiting if r.priority >= _OFFLINE_PRIORITY else online_waiting).append(r)
        num_online = len(online_running) + len(online_waiting)
        max_seqs, max_tokens, fallback = chan.budget_at(num_online, time.time())

        offline_running.sort(key=lambda r: r.arrival_time)
        plan = plan_step(
            online_tokens=sum(self._need(r) for r in online_running) + sum(self._need(r) for r in online_waiting),
            num_online_waiting=len(online_waiting),
            num_online_prefilling=sum(1 for r in online_running if _prefilling(r)),
            offline_running=[OfflineCandidate(self._need(r), _prefilling(r))
                             for r in offline_running],
            num_offline_waiting=len(offline_waiting),
            max_offline_seqs=max_seqs, max_offline_tokens=max_tokens,
            max_step_tokens=self.max_num_scheduled_tokens,
        )
        run = set(plan.run)
        paused = [r for i, r in enumerate(offline_running) if i not in run]
        # vLLM schedules running requests in list order: online first, then the offline ones we chose.
        self.running = online_running + offline_running
        saved_steps = [(r, r.next_decode_eligible_step) for r in paused]
        for r in paused:
            r.next_decode_eligible_step = self.current_step + 2
        offline_waiting.sort(key=lambda r: (r.priority, r.arrival_time))
        held = offline_waiting[plan.num_waiting_admitted:]
        if held:
            self.waiting.remove_requests(held)
        max_step_tokens = self.max_num_scheduled_tokens
        self.max_num_scheduled_tokens = plan.token_cap
        throttled = plan.throttled(len(offline_running), len(offline_waiting))
        chan.set_counters(num_online_running=len(online_running), num_online_waiting=len(online_waiting),
                          num_offline_running=len(offline_running) - len(paused),
                          num_offline_waiting=len(offline_waiting), num_offline_paused=len(paused),
                          online_context_tokens=sum(r.num_computed_tokens for r in online_running),
                          offline_context_tokens=sum(r.num_computed_tokens for r in offline_running))
        if throttled:
            chan.add_counter("num_throttled_steps", 1)
        if fallback:
            chan.add_counter("num_fallback_steps", 1)
        if plan.token_cap == 0:
            # Everything is paused and nothing is online: do not spin the engine loop flat out.
            time.sleep(0.001)

        def undo() -> None:
            self.max_num_scheduled_tokens = max_step_tokens
            for r, step in saved_steps:
                r.next_decode_eligible_step = step
            for r in held:
                self.waiting.add_request(r)

        return undo

    def _count_preempted(self, output) -> None:
        ids = getattr(output, "preempted_req_ids", None)
        if ids:
            n = sum(1 for i in ids if (r := self.requests.get(i)) is not None and r.priority >= _OFFLINE_PRIORITY)
            if n:
                self.channel.add_counter("num_offline_preempted_total", n)


def _async_variant():
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    class ColocateAsyncScheduler(ColocateScheduler, AsyncScheduler):
        """The same, for engines with async scheduling (vLLM's default on GPUs)."""

    return ColocateAsyncScheduler


ColocateAsyncScheduler = _async_variant()
