"""The Serve request router of the LLM deployment (`serve.offline_routing: room`).

Offline requests go to the replica with the most offline room, chat to the one of two random
replicas that holds less chat (`control.routing`). Each request's routing fulfils that request
(no FIFO mixin): a chat request never waits for older offline requests to be placed first.
"""

from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

from orchestrator.control.routing import (
    ROUTING_STATS_BUDGET_KEY,
    ROUTING_STATS_KEY,
    ROUTING_STATS_ONLINE_KEY,
    ROUTING_STATS_SEQ_KEY,
    rank_for_offline,
    rank_for_online,
)
from orchestrator.request_class import REQUEST_CLASS_FIELD, RequestClass, parse_request_class

ROUTER_CLS = "orchestrator.serving.router:OfflineRoomRouter"


def request_class_of(pending: PendingRequest | None) -> RequestClass:
    """The class the body claims (the LLM server's first argument); chat when unknown."""
    body: Any = pending.args[0] if pending is not None and pending.args else None
    extra = getattr(body, "model_extra", None) or (body if isinstance(body, dict) else {})
    try:
        return parse_request_class(extra.get(REQUEST_CLASS_FIELD))
    except ValueError:
        return RequestClass.ONLINE  # the replica answers it with a 400 wherever it lands


class OfflineRoomRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    def initialize_state(self, seed: int | None = None, **kwargs: Any) -> None:
        self._rng = random.Random(seed)
        self._sent_since: dict[Any, int] = {}
        self._online_sent_since: dict[Any, int] = {}
        self._stats_seq: dict[Any, Any] = {}

    def _stats(self, replica: RunningReplica) -> dict[str, Any]:
        """The replica's latest routing stats; what this router sent it since the last
        publication is forgotten once a fresh one arrives (it already counts those)."""
        stats = replica.routing_stats or {}
        rid = replica.replica_id
        if stats.get(ROUTING_STATS_SEQ_KEY) != self._stats_seq.get(rid):
            self._stats_seq[rid] = stats.get(ROUTING_STATS_SEQ_KEY)
            self._sent_since[rid] = self._online_sent_since[rid] = 0
        return stats

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if request_class_of(pending_request) is not RequestClass.OFFLINE:
            ids = sorted(self.apply_locality_routing(pending_request=pending_request), key=str)
            online = {rid: self._stats(self._replicas[rid]).get(ROUTING_STATS_ONLINE_KEY) for rid in ids}
            ranks = rank_for_online(ids, online, self._online_sent_since, self._rng)
            if len(ranks) > 1:  # ordered by chat load: count the pick until the next publication
                top = ranks[0][0]
                self._online_sent_since[top] = self._online_sent_since.get(top, 0) + 1
            return [[self._replicas[i] for i in rank] for rank in ranks]
        by_id = {r.replica_id: r for r in candidate_replicas}
        room: dict[Any, float | None] = {}
        budget: dict[Any, float | None] = {}
        for rid, replica in by_id.items():
            stats = self._stats(replica)
            room[rid] = stats.get(ROUTING_STATS_KEY)
            budget[rid] = stats.get(ROUTING_STATS_BUDGET_KEY)
        ranks = rank_for_offline(sorted(by_id, key=str), room, self._sent_since, self._rng, budget)
        if ranks:
            top = ranks[0][0]
            self._sent_since[top] = self._sent_since.get(top, 0) + 1
        return [[by_id[rank[0]]] for rank in ranks]
