"""Offline admission: how the in-flight allowance of a batch job follows the controller's budget."""

import asyncio

import pytest

from jobs.batch import Admission, parse_args
from orchestrator.control.admission import JOB_STALE_AFTER_S, allowance, share_budget

NOW_S = 1000.0


@pytest.mark.parametrize("total, weights, expected", [
    (8, {"a": 1, "b": 1}, {"a": 4, "b": 4}),
    (8, {"a": 3, "b": 1}, {"a": 6, "b": 2}),
    (10, {"a": 1, "b": 1, "c": 1}, {"a": 4, "b": 3, "c": 3}),
    (2, {"a": 1, "b": 1, "c": 1}, {"a": 1, "b": 1, "c": 1}),
    (5, {"a": 100, "b": 1}, {"a": 4, "b": 1}),
    (5, {}, {}),
])
def test_share_budget_is_proportional_to_weight_and_never_starves(total, weights, expected):
    shares = share_budget(total, weights)
    assert shares == expected
    if weights:
        assert sum(shares.values()) == max(total, len(weights))


def job(weight=1.0, default_cap=4, max_cap=None, age_s=0.0, **extra):
    return {"weight": weight, "default_cap": default_cap, "max_cap": max_cap, "seen_s": NOW_S - age_s, **extra}


def test_allowance_shares_among_live_jobs_and_forgets_stale_or_finished_ones():
    jobs = {"a": job(1), "b": job(3), "old": job(5, age_s=JOB_STALE_AFTER_S + 1), "done": job(5, finished=True)}
    # No controller: the largest static cap (4) is shared 1:3.
    assert (allowance(jobs, "a", NOW_S, None), allowance(jobs, "b", NOW_S, None)) == (1, 3)
    # A controller total of 12 splits 3:9, past the static cap of 4.
    assert (allowance(jobs, "a", NOW_S, 12), allowance(jobs, "b", NOW_S, 12)) == (3, 9)
    assert allowance(jobs, "done", NOW_S, None) == 4


def test_a_default_job_gets_the_whole_controller_budget_not_its_static_cap():
    jobs = {"a": job()}
    assert allowance(jobs, "a", NOW_S, 64) == 64
    assert allowance(jobs, "a", NOW_S, None) == 4
    # Heartbeats from before max_cap existed still read.
    assert allowance({"a": {"weight": 1.0, "default_cap": 4, "seen_s": NOW_S}}, "a", NOW_S, 64) == 64


def test_max_cap_bounds_the_allowance_always_and_only_when_set():
    jobs = {"a": job(max_cap=6), "b": job(max_cap=None), "small": job(default_cap=8, max_cap=2)}
    assert allowance(jobs, "a", NOW_S, 60) == 6
    assert allowance(jobs, "b", NOW_S, 60) == 20
    assert allowance(jobs, "small", NOW_S, None) == 2
    assert allowance({"gone": job(max_cap=3, finished=True)}, "gone", NOW_S, 60) == 3


class FakeActorAdmission(Admission):
    """Admission with the actor call replaced: `answer` is returned, or raised if an exception."""

    def __init__(self, answer, **kwargs):
        super().__init__("k", 1.0, use_ray=True, **kwargs)
        self.answer = answer
        self.calls = []

    def _heartbeat_blocking(self, progress):
        self.calls.append(progress)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_job_side_allowance_follows_the_actor_and_keeps_max_in_flight():
    followed = FakeActorAdmission(48, default_cap=4)
    asyncio.run(followed.heartbeat({}))
    assert followed.allowed == 48
    bounded = FakeActorAdmission(48, default_cap=4, max_cap=10)
    assert bounded.allowed == 4
    asyncio.run(bounded.heartbeat({}))
    assert bounded.allowed == 10
    unreachable = FakeActorAdmission(ConnectionError("gone"), default_cap=8, max_cap=3)
    asyncio.run(unreachable.heartbeat({}))
    assert unreachable.allowed == 3


def test_max_in_flight_is_optional_and_positive(tmp_path):
    (tmp_path / "in.jsonl").write_text("")
    base = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl")]
    assert parse_args(base).max_in_flight is None
    assert parse_args([*base, "--max-in-flight", "7"]).max_in_flight == 7
    with pytest.raises(SystemExit):
        parse_args([*base, "--max-in-flight", "0"])


def test_shortest_remaining_job_first_gives_the_total_to_the_job_nearest_its_end():
    from orchestrator.control.admission import share_shortest_remaining_first

    # 3 left in "a", 500 in "b", 40 in "c": "a" takes what it can use (3), "c" its 40, "b" the rest.
    assert share_shortest_remaining_first(64, {"a": 3, "b": 500, "c": 40}) == {"a": 3, "b": 21, "c": 40}
    # Every job keeps one in flight, whatever the total.
    assert share_shortest_remaining_first(2, {"a": 3, "b": 500, "c": 40}) == {"a": 1, "b": 1, "c": 1}
    # More slots than work anywhere: the shortest job holds the spare (it cannot use them, no harm).
    assert share_shortest_remaining_first(20, {"a": 2, "b": 3}) == {"a": 2 + 15, "b": 3}
    assert sum(share_shortest_remaining_first(37, {"x": 9, "y": 9, "z": 100}).values()) == 37


def test_allowance_under_the_shortest_remaining_policy_reads_each_jobs_progress():
    now = 1000.0
    jobs = {"long": {"weight": 10.0, "default_cap": 4, "seen_s": now, "total": 1000, "done": 10},
            "short": {"weight": 1.0, "default_cap": 4, "seen_s": now, "total": 100, "done": 95}}
    # Weighted: the heavy long job takes most; shortest-remaining: the short job takes its 5.
    assert allowance(jobs, "long", now, 32) > allowance(jobs, "short", now, 32)
    assert allowance(jobs, "short", now, 32, "shortest_remaining_first") == 5
    assert allowance(jobs, "long", now, 32, "shortest_remaining_first") == 27
    # Without a controller's total the policy does not apply: static caps as before.
    assert allowance(jobs, "short", now, None, "shortest_remaining_first") == allowance(jobs, "short", now, None)


def test_the_job_policy_is_typed_config():
    from pydantic import ValidationError

    from orchestrator.config import OrderConfig

    assert OrderConfig().job_policy == "weighted"
    assert OrderConfig(job_policy="shortest_remaining_first").job_policy == "shortest_remaining_first"
    with pytest.raises(ValidationError, match="job_policy"):
        OrderConfig(job_policy="lottery")


def test_admission_total_is_what_replicas_can_hold_and_leaves_chat_its_places_at_the_router():
    from orchestrator.control.sharing import admission_total, offline_slots

    assert offline_slots(64, max_num_seqs=32, max_ongoing_requests=256) == 32  # no more than the slots
    assert offline_slots(8, max_num_seqs=32, max_ongoing_requests=256) == 8
    # Serve's per-replica cap 48 with 32 slots: 16 offline, so 32 places stay for chat.
    assert offline_slots(64, max_num_seqs=32, max_ongoing_requests=48) == 16
    assert offline_slots(64) == 64  # an engine not yet started: its budget alone
    # Two replicas whose idle budgets (64) exceed their 32 slots: 64 in all, not 128.
    assert admission_total([(64, 32, 256), (64, 32, 256)]) == 64
    assert admission_total([(64, 32, 256), (64, 32, 256)], override_idle_seqs=4) == 8
    assert admission_total([]) == 1 and admission_total([(0, 32, 256)]) == 1


def test_max_ongoing_requests_defaults_to_twice_the_slots_and_refuses_less():
    from orchestrator.config import ConfigError, parse_config

    cfg = parse_config({"replicas": {"engine_kwargs": {"max_num_seqs": 256}}}, "x")
    assert cfg.replicas.effective_max_ongoing_requests == 512
    assert parse_config({}, "x").replicas.effective_max_ongoing_requests == 256
    with pytest.raises(ConfigError, match="at least twice"):
        parse_config({"replicas": {"max_ongoing_requests": 300, "engine_kwargs": {"max_num_seqs": 256}}}, "x")
