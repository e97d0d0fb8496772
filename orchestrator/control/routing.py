"""Where a request goes under `serve.offline_routing: room`, as data: an offline request to the
replica with the most offline room, a chat request to the one of two with less chat.

Serve routes every request to a replica by power of two choices on queue length, which knows
nothing of classes: a batch job's requests land as often on a replica whose chat leaves no
offline budget (they wait there, paused) as on an idle one. The offline class is routed by room
instead: each replica publishes, through Serve's routing stats, its offline budget at its current
online load minus the offline requests it already holds; between two publications the router
counts what it has sent each replica itself, so a burst of a job's requests does not all go to
the replica that looked emptiest a second ago. Once no replica has room left, a request goes
where it waits the fewest rounds of the offline work that replica runs (requests beyond its
budget over its budget): a replica whose chat leaves it no offline budget would hold the request
until its chat ends, however short its queue.

Chat keeps power of two choices, but on chat load rather than queue length: a queue counts the
offline requests a replica holds, which its budget pauses for chat anyway, so by queue length chat
avoids exactly the replicas the room rule fills with offline work and piles onto those that
already serve chat (in the simulator that cost up to 1.8 points of attainment; by chat load
attainment is Serve's again, within the intervals: routing-sim-2026-12-07 in docs/results).

Pure: `orchestrator.serving.router` is the Serve request router that calls it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Mapping, Sequence

ROUTING_STATS_KEY = "colocate_offline_room"
"""The routing-stats entry a replica publishes (`ColocateLLMServer.record_routing_stats`)."""
ROUTING_STATS_BUDGET_KEY = "colocate_offline_budget"
"""The offline sequences the replica runs at its current online load (the room's budget)."""
ROUTING_STATS_ONLINE_KEY = "colocate_online_inflight"
"""The chat requests the replica holds."""
ROUTING_STATS_SEQ_KEY = "colocate_stats_seq"
"""Changes with every publication: the router's own counts since the last one start again."""


def offline_room(budget_seqs: int, num_offline_held: int) -> int:
    """Offline requests a replica can still start now: its budget at the current online load
    less the offline requests it already holds (may be negative: it holds more than it runs)."""
    return budget_seqs - num_offline_held


def rank_for_offline(replica_ids: Sequence[Hashable], room: Mapping[Hashable, float | None],
                     sent_since: Mapping[Hashable, int], rng: random.Random,
                     budget: Mapping[Hashable, float | None] | None = None) -> list[list[Hashable]]:
    """Replicas in the order an offline request should try them, one per rank, ties in random
    order. Those with room left (published room less what was sent since) come first, most room
    first; then the rest by the rounds the request would wait there: how many requests would be
    ahead of it beyond the replica's budget, over that budget. A replica with no budget at its
    online load (its chat leaves none), or that has published nothing yet (None), waits without
    bound: last, used only when every replica is so."""
    budget = budget or {}

    def key(rid):
        published = room.get(rid)
        left = (0.0 if published is None else float(published)) - sent_since.get(rid, 0)
        if left > 0:
            return (0, -left, rng.random())
        seqs = budget.get(rid)
        rounds = (1.0 - left) / float(seqs) if seqs else math.inf
        return (1, rounds, rng.random())

    return [[rid] for rid in sorted(replica_ids, key=key)]


def two_choices(replica_ids: Sequence[Hashable], rng: random.Random) -> list[list[Hashable]]:
    """Serve's power of two choices: two distinct random replicas, one rank (the router then
    takes the one with the shorter queue that accepts)."""
    if len(replica_ids) <= 2:
        ids = list(replica_ids)
        rng.shuffle(ids)
        return [ids] if ids else []
    return [rng.sample(list(replica_ids), 2)]


def rank_for_online(replica_ids: Sequence[Hashable], online: Mapping[Hashable, float | None],
                    sent_since: Mapping[Hashable, int], rng: random.Random) -> list[list[Hashable]]:
    """Power of two choices on chat load: two distinct random replicas, the one holding fewer
    chat requests (published count plus what was sent since) first, each its own rank, so the
    router falls back to the other only if the first is full. While either has published
    nothing, one rank of both: Serve's own pick by queue length."""
    (pair,) = two_choices(replica_ids, rng) or [[]]
    if len(pair) < 2 or any(online.get(rid) is None for rid in pair):
        return [pair] if pair else []

    def key(rid):
        return (float(online[rid]) + sent_since.get(rid, 0), rng.random())

    return [[rid] for rid in sorted(pair, key=key)]
