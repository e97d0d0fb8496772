"""The step plan: which offline work runs in the next engine step, as data, from a pure function.

The engine's scheduler (`orchestrator.engine.scheduler`) calls `plan_step` before every step with
what it sees (online demand, the offline requests it holds, the budget for the current online
count) and applies the returned `StepPlan`. Nothing here touches vLLM, so the plan is unit-tested
with plain numbers and any other caller (a simulator) can run the very same decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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
