"""How batch jobs share offline capacity, as pure functions (no Ray): the admission actor
(`orchestrator.control.admission`) and the simulator (`orchestrator.sim`) call the same ones."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

JOB_STALE_AFTER_S = 30.0


def share_budget(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split `total` in-flight slots among jobs by weight (largest remainder), each job at least 1.

    A job never gets zero: a starved job would hold its checkpoint open forever.
    """
    if not weights:
        return {}
    positive = {k: max(w, 1e-9) for k, w in weights.items()}
    total = max(total, len(positive))
    weight_sum = sum(positive.values())
    exact = {k: total * w / weight_sum for k, w in positive.items()}
    shares = {k: max(1, math.floor(v)) for k, v in exact.items()}
    leftover = total - sum(shares.values())
    # Largest remainder first; ties go to the heavier job, then by name, so shares are stable.
    for k in sorted(exact, key=lambda k: (-(exact[k] - math.floor(exact[k])), -positive[k], k)):
        if leftover <= 0:
            break
        shares[k] += 1
        leftover -= 1
    return shares


JOB_POLICIES = ("weighted", "shortest_remaining_first")


def share_shortest_remaining_first(total: int, remaining: dict[str, int]) -> dict[str, int]:
    """Split `total` in-flight slots so the job with the fewest requests left finishes first.

    Every job keeps at least 1 slot (a starved job would hold its checkpoint open forever, and a
    long job must still move); the rest goes to jobs in order of fewest remaining requests (ties
    by name), each taking at most what it can still use (its remaining requests), the next job
    the rest. Shortest-remaining-job-first minimises the mean job completion time when jobs share
    one capacity; weights are ignored."""
    if not remaining:
        return {}
    total = max(total, len(remaining))
    shares = {k: 1 for k in remaining}
    leftover = total - len(shares)
    order = sorted(remaining, key=lambda k: (max(0, remaining[k]), k))
    for k in order:
        take = min(leftover, max(0, remaining[k] - 1))
        shares[k] += take
        leftover -= take
    if leftover > 0:  # more slots than requests left anywhere: the shortest job holds the rest
        shares[order[0]] += leftover
    return shares


def allowance(jobs: dict[str, dict[str, Any]], job_key: str, now_s: float, total_budget: int | None,
              policy: str = "weighted") -> int:
    """In-flight offline requests `job_key` may hold, never more than its own `max_cap` (if it set one).

    With a total set by the controller, the job gets its weighted share of that total among live
    jobs (seen within JOB_STALE_AFTER_S, not finished): the controller sized the total to what the
    replicas can absorb, so a job's static `default_cap` must not hold it below its share. With no
    total (no controller), the largest static cap of the live jobs is shared by weight and no job
    exceeds its own static cap: without a controller nothing says more is safe. With `policy`
    `shortest_remaining_first` a controller's total goes to the jobs with the fewest requests
    left first (`share_shortest_remaining_first`; a job's remaining count is its `total - done`).
    """
    job = jobs[job_key]
    max_cap = job.get("max_cap")
    live = {k: j for k, j in jobs.items() if now_s - j["seen_s"] <= JOB_STALE_AFTER_S and not j.get("finished")}
    weights = {k: j["weight"] for k, j in live.items()}
    if job_key not in live:
        allowed = job["default_cap"]
    elif total_budget is not None and policy == "shortest_remaining_first":
        remaining = {k: int(j.get("total", 0)) - int(j.get("done", 0)) for k, j in live.items()}
        allowed = share_shortest_remaining_first(total_budget, remaining)[job_key]
    elif total_budget is not None:
        allowed = share_budget(total_budget, weights)[job_key]
    else:
        allowed = min(job["default_cap"], share_budget(max(j["default_cap"] for j in live.values()), weights)[job_key])
    return allowed if max_cap is None else max(1, min(allowed, max_cap))


def offline_slots(idle_offline_seqs: int, max_num_seqs: int | None = None,
                  max_ongoing_requests: int | None = None) -> int:
    """Offline requests one replica can usefully hold in flight: its budget at no online load,
    but no more than its engine has sequence slots for (the rest would only wait in the engine),
    and no more than leaves a full engine's worth of Serve's per-replica places
    (`max_ongoing_requests`) to chat, so chat never waits at Serve's router behind offline work."""
    slots = idle_offline_seqs
    if max_num_seqs:
        slots = min(slots, max_num_seqs)
    if max_ongoing_requests:
        slots = min(slots, max_ongoing_requests - (max_num_seqs or 0))
    return max(0, slots)


def admission_total(replicas: Iterable[tuple[int, int | None, int | None]],
                    override_idle_seqs: int | None = None) -> int:
    """The offline concurrency batch jobs share: what every replica can usefully hold
    (`offline_slots` of its (idle budget, max_num_seqs, max_ongoing_requests)), summed. A
    pinned budget (`override_idle_seqs`, its idle row) replaces each replica's idle budget."""
    total = sum(offline_slots(idle if override_idle_seqs is None else override_idle_seqs, seqs, ongoing)
                for idle, seqs, ongoing in replicas)
    return max(1, total)
