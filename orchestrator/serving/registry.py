"""A named Ray actor where replicas report their load; `colocate status` and the controller read it."""

from __future__ import annotations

import time
from typing import Any

import ray

from orchestrator.names import NAMESPACE, REGISTRY_NAME

STALE_AFTER_S = 10.0


@ray.remote(num_cpus=0)
class ReplicaRegistry:
    def __init__(self) -> None:
        self._reports: dict[str, dict[str, Any]] = {}

    def report(self, stats: dict[str, Any]) -> None:
        # Aged on this actor's clock: the replica's own stamp is another host's wall clock.
        self._reports[stats["replica_id"]] = {**stats, "received_at_s": time.time()}

    def snapshot(self, max_age_s: float = STALE_AFTER_S) -> list[dict[str, Any]]:
        """Reports younger than `max_age_s`; older ones belong to replicas that went away."""
        now_s = time.time()
        return [r for r in self._reports.values() if now_s - r["received_at_s"] <= max_age_s]


def get_or_create_registry():
    return ReplicaRegistry.options(
        name=REGISTRY_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()
