"""In-engine enforcement of the offline budget, at every step.

`ColocateScheduler` is vLLM's scheduler (with step telemetry) that, before each step, reads the
offline budget from the engine channel for the current number of online requests and applies it
(`orchestrator.engine.enforce`, planned by the pure `orchestrator.engine.plan.plan_step`):

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
- waiting offline requests are admitted only up to the budget's free sequences;
- with length-aware ordering (`orchestrator.engine.order`), a waiting chat request past its
  starvation guard is moved to the front level (served by arrival among such requests); with
  `srpt`, a chat request early in a long predicted run is preempted for a much shorter waiting
  one that finds no room.

If the controller stops refreshing the budget, the channel hands out the safe fallback budget.
Any error in this path is logged, whatever it changed is undone, and the engine runs unplanned
from then on: enforcement must never take the engine down or lose a request.
"""

from __future__ import annotations

import logging
import os
import time

from orchestrator.compat.vllm_api import async_scheduler_base, quiet_engine_polling
from orchestrator.config import OrderConfig
from orchestrator.engine.enforce import OFFLINE_PRIORITY, BudgetEnforcer, counts_as_counters
from orchestrator.engine.order import LimitedPreemption, WaitingGuard
from orchestrator.engine.telemetry import TelemetryScheduler
from orchestrator.names import ENV_ENGINE_ORDER, ENV_POLL_SLEEP_US

log = logging.getLogger(__name__)


class ColocateScheduler(TelemetryScheduler):
    """vLLM's scheduler with step telemetry and the per-step offline budget."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._plan_failed = False
        if quiet_engine_polling(float(os.environ.get(ENV_POLL_SLEEP_US, "0"))):
            log.info("colocate: engine core polls its worker every %s us instead of spinning",
                     os.environ[ENV_POLL_SLEEP_US])
        order = os.environ.get(ENV_ENGINE_ORDER)
        self._order = OrderConfig.model_validate_json(order) if order else OrderConfig()
        self._enforcer = BudgetEnforcer(self.access, offline_policy=self._order.offline_policy,
                                        max_wait_s=self._order.max_wait_s)
        self._guard = WaitingGuard(self._order)
        self._preemption = (LimitedPreemption.from_config(self._order) if self._order.policy == "srpt"
                            else LimitedPreemption(self._order))
        if self.channel is not None:
            self.channel.set_counters(max_num_seqs=self.access.max_num_seqs)

    def schedule(self, *args, **kwargs):
        if self._order.policy != "fcfs":
            try:
                self._guard_waiting()
            except Exception:  # noqa: BLE001 - ordering is an optimisation; never take the engine down
                self._order = OrderConfig()
                self._guard = WaitingGuard(self._order)
                self._preemption = LimitedPreemption(self._order)
                log.exception("colocate: length-ordering guard failed; serving by arrival from now on")
        undo = None
        if self.channel is not None and not self._plan_failed:
            try:
                undo = self._apply_budget()
            except Exception:  # noqa: BLE001 - never take the engine down
                self._plan_failed = True
                log.exception("colocate: offline budget enforcement failed (changes undone); running unplanned")
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            if undo is not None:
                undo()
        if undo is not None:
            self._count_preempted(output)
        return output

    def _guard_waiting(self) -> None:
        """Age waiting chat requests and promote those past their guard (`order.WaitingGuard`);
        with `srpt`, preempt a long chat request early in its run for a short waiting one
        (`order.LimitedPreemption`; not undone: the request waits again, as vLLM's own
        preemption leaves it)."""
        promoted = self._guard.apply(self.access, time.time())
        if promoted and self.channel is not None:
            self.channel.add_counter("num_guard_promotions", promoted)
        if self._order.policy == "srpt":
            preempted = self._preemption.apply(self.access, time.monotonic())
            if preempted and self.channel is not None:
                self.channel.add_counter("num_chat_preempted_total", preempted)

    def _apply_budget(self):
        chan = self.channel
        fallback = []

        def budget_at(num_online: int) -> tuple[int, int]:
            seqs, tokens, is_fallback = chan.budget_at(num_online, time.time())
            fallback.append(is_fallback)
            return seqs, tokens

        undo, _, counts = self._enforcer.apply(budget_at)
        chan.set_counters(**counts_as_counters(counts))
        if counts.throttled:
            chan.add_counter("num_throttled_steps", 1)
        if fallback and fallback[0]:
            chan.add_counter("num_fallback_steps", 1)
        if counts.idle:
            # Everything is paused and nothing is online: do not spin the engine loop flat out.
            time.sleep(0.001)
        return undo

    def _count_preempted(self, output) -> None:
        n = 0
        for request_id in self.access.preempted_ids(output):
            r = self.access.request(request_id)
            if r is not None and self.access.priority(r) >= OFFLINE_PRIORITY:
                n += 1
        if n:
            self.channel.add_counter("num_offline_preempted_total", n)


class ColocateAsyncScheduler(ColocateScheduler, async_scheduler_base()):
    """The same, for engines with async scheduling (vLLM's default on GPUs)."""
