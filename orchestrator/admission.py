"""Sharing offline capacity between batch jobs.

Each running batch job registers with one named actor and asks it, every few seconds, how many
offline requests it may keep in flight. The actor divides a total offline concurrency budget among
the live jobs in proportion to their weights. Until a controller sets the total, it is the static
cap from the job's own command line. Job progress is kept here too, for `colocate jobs`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import ray

NAMESPACE = "colocate"
ADMISSION_NAME = "colocate-offline-admission"
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
    """In-flight offline requests `job_key` may hold: its weighted share of `total_budget` among
    live jobs (seen within JOB_STALE_AFTER_S, not finished), never more than its own static cap.
    With no budget set by a controller, the total is the largest static cap the live jobs asked for."""
    job = jobs[job_key]
    live = {k: j for k, j in jobs.items() if now_s - j["seen_s"] <= JOB_STALE_AFTER_S and not j.get("finished")}
    if job_key not in live:
        return job["default_cap"]
    total = total_budget if total_budget is not None else max(j["default_cap"] for j in live.values())
    return min(job["default_cap"], share_budget(total, {k: j["weight"] for k, j in live.items()})[job_key])


@ray.remote(num_cpus=0)
class OfflineAdmission:
    def __init__(self) -> None:
        self._jobs: dict[str, dict[str, Any]] = {}
        self._total_budget: int | None = None

    def set_total_budget(self, total: int | None) -> None:
        self._total_budget = total

    def heartbeat(self, job_key: str, weight: float, default_cap: int, progress: dict[str, Any]) -> int:
        """Record a job's progress; return how many offline requests it may keep in flight."""
        now_s = time.time()
        self._jobs[job_key] = {"weight": weight, "default_cap": default_cap, "seen_s": now_s, **progress}
        return allowance(self._jobs, job_key, now_s, self._total_budget)

    def jobs(self) -> dict[str, dict[str, Any]]:
        return dict(self._jobs)


def get_or_create_admission():
    return OfflineAdmission.options(
        name=ADMISSION_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()
