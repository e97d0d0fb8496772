"""Sharing offline capacity between batch jobs.

Each running batch job registers with one named actor and asks it, every few seconds, how many
offline requests it may keep in flight. The actor divides a total offline concurrency budget among
the live jobs in proportion to their weights. Until a controller sets the total, each job keeps to
the static cap from its own command line (`--concurrency`). Job progress is kept here too, for
`colocate jobs`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import ray

from orchestrator.names import ADMISSION_NAME, NAMESPACE

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


def allowance(jobs: dict[str, dict[str, Any]], job_key: str, now_s: float, total_budget: int | None) -> int:
    """In-flight offline requests `job_key` may hold, never more than its own `max_cap` (if it set one).

    With a total set by the controller, the job gets its weighted share of that total among live
    jobs (seen within JOB_STALE_AFTER_S, not finished): the controller sized the total to what the
    replicas can absorb, so a job's static `default_cap` must not hold it below its share. With no
    total (no controller), the largest static cap of the live jobs is shared by weight and no job
    exceeds its own static cap: without a controller nothing says more is safe.
    """
    job = jobs[job_key]
    max_cap = job.get("max_cap")
    live = {k: j for k, j in jobs.items() if now_s - j["seen_s"] <= JOB_STALE_AFTER_S and not j.get("finished")}
    weights = {k: j["weight"] for k, j in live.items()}
    if job_key not in live:
        allowed = job["default_cap"]
    elif total_budget is not None:
        allowed = share_budget(total_budget, weights)[job_key]
    else:
        allowed = min(job["default_cap"], share_budget(max(j["default_cap"] for j in live.values()), weights)[job_key])
    return allowed if max_cap is None else max(1, min(allowed, max_cap))


@ray.remote(num_cpus=0)
class OfflineAdmission:
    def __init__(self) -> None:
        self._jobs: dict[str, dict[str, Any]] = {}
        self._total_budget: int | None = None

    def set_total_budget(self, total: int | None) -> None:
        self._total_budget = total

    def heartbeat(self, job_key: str, weight: float, default_cap: int, progress: dict[str, Any],
                  max_cap: int | None = None) -> int:
        """Record a job's progress; return how many offline requests it may keep in flight.

        `max_cap` is the job's `--max-in-flight` (None: no bound of its own); it comes last and
        optional so that a call without it still means what it did."""
        now_s = time.time()
        self._jobs[job_key] = {**progress, "weight": weight, "default_cap": default_cap, "max_cap": max_cap,
                               "seen_s": now_s}
        return allowance(self._jobs, job_key, now_s, self._total_budget)

    def jobs(self) -> dict[str, dict[str, Any]]:
        return dict(self._jobs)


def get_or_create_admission():
    return OfflineAdmission.options(
        name=ADMISSION_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()
