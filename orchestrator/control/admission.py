"""Sharing offline capacity between batch jobs.

Each running batch job registers with one named actor and asks it, every few seconds, how many
offline requests it may keep in flight. The actor divides a total offline concurrency budget among
the live jobs in proportion to their weights. Until a controller sets the total, each job keeps to
the static cap from its own command line (`--concurrency`). Job progress is kept here too, for
`colocate jobs`.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from orchestrator.control.sharing import (  # noqa: F401 - re-exported: the actor's rule
    JOB_POLICIES,
    JOB_STALE_AFTER_S,
    allowance,
    share_budget,
    share_shortest_remaining_first,
)
from orchestrator.names import ADMISSION_NAME, NAMESPACE


@ray.remote(num_cpus=0)
class OfflineAdmission:
    def __init__(self) -> None:
        self._jobs: dict[str, dict[str, Any]] = {}
        self._total_budget: int | None = None
        self._policy = "weighted"

    def set_total_budget(self, total: int | None, policy: str = "weighted") -> None:
        if policy not in JOB_POLICIES:
            raise ValueError(f"job policy {policy!r} is not one of {JOB_POLICIES}")
        self._total_budget = total
        self._policy = policy

    def heartbeat(self, job_key: str, weight: float, default_cap: int, progress: dict[str, Any],
                  max_cap: int | None = None) -> int:
        """Record a job's progress; return how many offline requests it may keep in flight.

        `max_cap` is the job's `--max-in-flight` (None: no bound of its own); it comes last and
        optional so that a call without it still means what it did."""
        now_s = time.time()
        self._jobs[job_key] = {**progress, "weight": weight, "default_cap": default_cap, "max_cap": max_cap,
                               "seen_s": now_s}
        return allowance(self._jobs, job_key, now_s, self._total_budget, self._policy)

    def jobs(self) -> dict[str, dict[str, Any]]:
        return dict(self._jobs)


def get_or_create_admission():
    return OfflineAdmission.options(
        name=ADMISSION_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()
