"""Offline routing by room (orchestrator.control.routing): the pure ranking the Serve request
router calls, and how it reads a request's class."""

from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace

from pydantic import BaseModel, ConfigDict

from orchestrator.control.routing import offline_room, rank_for_offline, rank_for_online, two_choices
from orchestrator.request_class import RequestClass


def test_offline_goes_to_the_replica_with_room_and_spreads_a_burst():
    rng = random.Random(0)
    room = {"busy": 0, "idle": 6, "half": 3}
    assert [r[0] for r in rank_for_offline(["busy", "idle", "half"], room, {}, rng)] == ["idle", "half", "busy"]
    # What the router sent since the last publication counts against the room it published.
    sent: Counter = Counter()
    for _ in range(9):
        top = rank_for_offline(["busy", "idle", "half"], room, sent, rng)[0][0]
        sent[top] += 1
    assert sent == {"idle": 6, "half": 3}  # greedy on room left: the burst fills both, busy gets none
    # A replica that has not published yet ranks as having none: after any with room.
    assert rank_for_offline(["new", "idle"], {"new": None, "idle": 1}, {}, rng)[0] == ["idle"]
    assert offline_room(8, 3) == 5 and offline_room(2, 5) == -3


def test_ties_are_broken_at_random_and_chat_gets_two_choices():
    rng = random.Random(1)
    firsts = Counter(rank_for_offline(["a", "b"], {"a": 2, "b": 2}, {}, rng)[0][0] for _ in range(200))
    assert 60 < firsts["a"] < 140
    (pair,) = two_choices(["a", "b", "c", "d"], rng)
    assert len(set(pair)) == 2 and set(pair) <= {"a", "b", "c", "d"}
    assert sorted(two_choices(["a", "b"], rng)[0]) == ["a", "b"] and two_choices([], rng) == []


def test_the_router_reads_the_class_the_body_claims():
    from orchestrator.serving.router import request_class_of

    class Body(BaseModel):
        model_config = ConfigDict(extra="allow")
        messages: list = []

    def pending(body):
        return SimpleNamespace(args=[body, None])

    assert request_class_of(pending(Body(request_class="offline"))) is RequestClass.OFFLINE
    assert request_class_of(pending(Body())) is RequestClass.ONLINE
    assert request_class_of(pending(Body(request_class="vip"))) is RequestClass.ONLINE  # the replica 400s it
    assert request_class_of(pending({"request_class": "offline"})) is RequestClass.OFFLINE
    assert request_class_of(None) is RequestClass.ONLINE


def test_without_room_a_request_goes_where_it_waits_the_fewest_rounds():
    """Past every replica's room, a request waits where the fewest requests are ahead of it per
    offline sequence run there; a replica whose chat leaves no budget would hold it until its
    chat ends, so it gets none while another replica runs any offline work at all."""
    rng = random.Random(2)
    sent: Counter = Counter()
    room, budget = {"busy": 0, "idle": 4}, {"busy": 0, "idle": 4}
    for _ in range(12):
        top = rank_for_offline(["busy", "idle"], room, sent, rng, budget)[0][0]
        sent[top] += 1
    assert sent == {"idle": 12}
    # Overflow is shared in proportion to the budgets: 4 and 2 sequences, 12 past their room.
    sent.clear()
    room, budget = {"a": 0, "b": 0}, {"a": 4, "b": 2}
    for _ in range(12):
        top = rank_for_offline(["a", "b"], room, sent, rng, budget)[0][0]
        sent[top] += 1
    assert sent == {"a": 8, "b": 4}
    # Room first, however the overflow would fall.
    assert rank_for_offline(["a", "b"], {"a": 1, "b": -5}, {}, rng, {"a": 1, "b": 100})[0] == ["a"]
    # Nobody has a budget: ties at random, as without budgets.
    firsts = Counter(rank_for_offline(["a", "b"], {"a": 0, "b": 0}, {}, rng, {"a": 0, "b": None})[0][0]
                     for _ in range(200))
    assert 60 < firsts["a"] < 140


def test_chat_goes_to_the_one_of_two_with_less_chat_counting_what_was_sent_since():
    rng = random.Random(3)
    online = {"a": 3, "b": 0}
    for _ in range(20):
        ranks = rank_for_online(["a", "b"], online, {}, rng)
        assert ranks == [["b"], ["a"]]  # the other only if the first is full
    # What the router sent since the last publication counts: a burst alternates.
    sent: Counter = Counter()
    for _ in range(7):
        top = rank_for_online(["a", "b"], online, sent, rng)[0][0]
        sent[top] += 1
    assert sent == {"b": 5, "a": 2}  # b up to a's 3, then one each
    # Two of many, distinct, at random.
    picks = Counter(tuple(sorted(r[0] for r in rank_for_online(list("abcd"), dict.fromkeys("abcd", 0), {}, rng)))
                    for _ in range(300))
    assert len(picks) == 6 and all(a != b for a, b in picks)
    # Unpublished: one rank of both (Serve's pick by queue length), as before any stats.
    assert sorted(rank_for_online(["a", "b"], {"a": None, "b": 2}, {}, rng)[0]) == ["a", "b"]
    assert rank_for_online(["a"], {"a": 0}, {}, rng) == [["a"]] and rank_for_online([], {}, {}, rng) == []
