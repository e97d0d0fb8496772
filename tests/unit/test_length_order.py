"""Length-aware ordering: levels from predictions and trust, the starvation guard, the
priorities they become, the replica-side wiring, and the config's checks."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.config import ConfigError, OrderConfig, load_config
from orchestrator.engine.order import guard_due, priority_level, tokens_of_level
from orchestrator.request_class import NUM_LEVELS, RequestClass, level_of, vllm_priority
from orchestrator.serving.length_order import LengthOrdering, prompt_text

SJF = OrderConfig(policy="sjf", predictor_path="/nowhere")


def test_levels_grow_with_predicted_length_and_merge_as_trust_falls():
    levels = [priority_level(n, 1.0, SJF) for n in (1, 10, 100, 1000)]
    assert levels == sorted(levels) and len(set(levels)) == 4
    assert priority_level(100, 1.0, SJF) > priority_level(100, 0.5, SJF) > 0
    assert priority_level(100, 0.0, SJF) == 0 == priority_level(None, 1.0, SJF)
    assert priority_level(10**9, 1.0, SJF) < NUM_LEVELS
    assert priority_level(100, 1.0, OrderConfig()) == 0  # fcfs: every request at level 0


def test_level_decodes_to_a_lower_bound_of_its_prediction():
    for n in (3, 50, 700):
        assert tokens_of_level(priority_level(n, 1.0, SJF), SJF) <= n


def test_guard_serves_by_arrival_after_the_wait_bound_or_ten_service_times():
    level = priority_level(100, 1.0, SJF)
    service_steps = tokens_of_level(level, SJF)
    assert not guard_due(level, waited_s=1.0, waited_steps=int(service_steps), cfg=SJF)
    assert guard_due(level, waited_s=1.0, waited_steps=int(11 * service_steps), cfg=SJF)
    assert guard_due(level, waited_s=SJF.max_wait_s + 1, waited_steps=0, cfg=SJF)
    assert not guard_due(0, waited_s=10**6, waited_steps=10**6, cfg=SJF)  # already first


def test_priorities_keep_classes_apart_at_every_level():
    offline = vllm_priority(RequestClass.OFFLINE)
    assert vllm_priority(RequestClass.ONLINE, NUM_LEVELS - 1) < offline
    assert level_of(vllm_priority(RequestClass.OFFLINE, 7)) == 7
    with pytest.raises(ValueError, match="level"):
        vllm_priority(RequestClass.ONLINE, NUM_LEVELS)


def test_order_config_needs_a_predictor_for_length_policies(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("kind: ColocateConfig\nversion: 1\norder:\n  policy: sjf\n")
    with pytest.raises(ConfigError, match="predictor_path"):
        load_config(path)
    path.write_text("kind: ColocateConfig\nversion: 1\norder:\n  policy: shortest\n")
    with pytest.raises(ConfigError, match="order.policy"):
        load_config(path)


class _Request:
    def __init__(self, messages=None, prompt=None):
        self.messages, self.prompt = messages, prompt


def test_prompt_text_reads_the_user_turns_or_the_prompt():
    req = _Request(messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                             {"role": "user", "content": [{"type": "text", "text": "there"}]}])
    assert prompt_text(req) == "hi\nthere"
    assert prompt_text(_Request(prompt="complete this")) == "complete this"


class _ByWords:
    """A predictor double: the reply is ten tokens per prompt word."""

    quantiles = (0.5,)

    def predict(self, prompts):
        return np.asarray([[10.0 * len(p.split())] for p in prompts])


def test_replica_ordering_levels_observe_and_fall_back_to_fcfs_on_bad_predictions():
    ordering = LengthOrdering(SJF, _ByWords())
    assert ordering.uses_predictions(RequestClass.ONLINE)
    assert not ordering.uses_predictions(RequestClass.OFFLINE)  # offline_policy fcfs
    short, _ = ordering.level(RequestClass.ONLINE, "two words")
    long, prediction = ordering.level(RequestClass.ONLINE, " ".join(["w"] * 40))
    assert 0 < short < long and prediction == pytest.approx((400.0, 400.0))
    # Completions whose lengths run opposite to the predictions: trust, then the levels, collapse.
    rng = np.random.default_rng(0)
    for i in range(200):
        words = int(rng.integers(1, 50))
        text = " ".join([f"w{i}"] * words)
        _, p = ordering.level(RequestClass.ONLINE, text)
        ordering.observe(text, p, actual_tokens=10 * (51 - words))
    assert ordering.monitor.trust() == 0.0
    assert ordering.level(RequestClass.ONLINE, " ".join(["w"] * 40))[0] == 0
    assert ordering.status()["live_tau"] < -0.5


def test_aging_lowers_every_waiting_level_at_one_rate_set_by_a_typical_request():
    from orchestrator.engine.order import aged_level

    typical = 24.0
    long, short = priority_level(255, 1.0, SJF), priority_level(24, 1.0, SJF)
    assert aged_level(long, 0, SJF, typical) == long
    # One octave per typical service time waited, for long and short requests alike.
    assert aged_level(long, int(typical), SJF, typical) == long - SJF.levels_per_octave
    assert aged_level(short, int(typical), SJF, typical) == short - SJF.levels_per_octave
    # A request ~10x the typical length competes with fresh typical ones after ~log2(10) service times.
    assert aged_level(long, int(3.5 * typical), SJF, typical) <= short
    assert aged_level(long, 10**6, SJF, typical) == 0
    off = OrderConfig(policy="sjf", predictor_path="x", aging_octaves_per_service=0)
    assert aged_level(long, 10**6, off, typical) == long


def test_prefix_sharing_order_is_a_depth_first_walk_of_the_prompt_trie_with_a_freshness_guard():
    from orchestrator.engine.order import prefix_sharing_order

    header_a, header_b = [1, 2, 3, 4], [1, 2, 9, 9]
    prompts = [header_b + [5], header_a + [7], [8, 8], header_a + [6], header_b + [5, 1], header_a + [7]]
    arrivals = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    order = prefix_sharing_order(prompts, arrivals, now_s=10.0, max_wait_s=100.0)
    # Shared prefixes are contiguous, the longest shared ones adjacent; equal prompts by arrival.
    assert order == [3, 1, 5, 0, 4, 2]
    # A request waiting max_wait_s or more goes first, by arrival, whatever it sorts as.
    assert prefix_sharing_order(prompts, arrivals, now_s=102.5, max_wait_s=100.0)[:3] == [0, 1, 2]


def test_enforcement_admits_waiting_offline_work_grouped_by_prefix_when_configured():
    from orchestrator.engine.enforce import BudgetEnforcer
    from tests.unit.test_engine_safety import FakeView, Req

    waiting = []
    for i, head in enumerate([[5, 5], [1, 1], [5, 5], [1, 1]]):
        r = Req(f"w{i}", True, computed=0, prompt=40, total=40, arrival=float(i))
        r.tokens = head + [i]
        waiting.append(r)
    view = FakeView([], waiting)
    view.prompt_token_ids = lambda r: r.tokens
    enforcer = BudgetEnforcer(view, offline_policy="prefix_sharing", wall_clock=lambda: 10.0)
    assert [r.name for r in enforcer.offline_admission_order(waiting, num_online=0)] == ["w1", "w3", "w0", "w2"]
    # The default admits by arrival.
    assert [r.name for r in BudgetEnforcer(view).offline_admission_order(waiting, 0)] == ["w0", "w1", "w2", "w3"]


def test_prefix_sharing_needs_no_predictor_but_short_first_does():
    from pydantic import ValidationError

    from orchestrator.config import OrderConfig

    assert OrderConfig(offline_policy="prefix_sharing").predictor_path is None
    with pytest.raises(ValidationError, match="predictor_path"):
        OrderConfig(offline_policy="short_first_under_chat")


SRPT = OrderConfig(policy="srpt", predictor_path="/nowhere")


def test_limited_preemption_takes_the_longest_early_request_for_a_much_shorter_one_only_without_room():
    from orchestrator.engine.order import RunningChat, preemption_victim

    running = [RunningChat("long-early", 800.0, 10, 2), RunningChat("mid-early", 300.0, 5, 2),
               RunningChat("long-late", 900.0, 400, 2), RunningChat("long-big", 1000.0, 1, 50)]
    no_slot = {"slot_free": False, "free_blocks": 40, "needed_blocks": 2, "total_blocks": 100, "cfg": SRPT}

    def pick(wanted=20.0, running=running, **kw):
        return preemption_victim(wanted, running, **{**no_slot, **kw})

    assert pick() == "long-early"  # most left among the early, small ones
    assert pick(slot_free=True) is None  # it would be admitted anyway
    assert pick(preempted_before={"long-early"}) == "mid-early"  # at most once each
    assert pick(cfg=SJF) is None and pick(cfg=OrderConfig()) is None
    # Near completion (past 25% of its prediction) or holding much KV: left to finish.
    assert pick(running=running[2:]) is None
    # A waiting request about as long as what the victim has left is no reason to preempt.
    assert pick(wanted=500.0, running=running[:1]) is None
    # No prediction (level 0 at arrival, or trust 0): nothing preempted.
    assert pick(wanted=tokens_of_level(0, SRPT)) is None
    # Short of KV rather than of a slot: only a victim whose blocks make the request fit.
    short_of_kv = {"slot_free": True, "free_blocks": 5, "needed_blocks": 8}
    assert pick(**short_of_kv) is None  # the early ones hold 2 blocks each: 5 + 2 < 8
    assert pick(running=[RunningChat("small", 800.0, 1, 2)], **short_of_kv) is None  # 5 + 2 < 8
    assert pick(running=[RunningChat("fits", 800.0, 1, 4)], **short_of_kv) == "fits"  # 5 + 4 >= 8


def test_refreshed_predictions_count_what_a_running_request_likely_has_left():
    """TRAIL's refresh: with the predictor's residual distribution, a request that has produced
    tokens has E[L - g | L > g] left, not its median minus g; the waiting request's need is the
    same expectation before any token."""
    from latency_model.length.predictor import expected_remaining
    from orchestrator.engine.order import LimitedPreemption, RunningChat, preemption_victim

    # Lengths of a prediction of 100 tokens: 10, 100 or 1,000 alike (residuals in log1p space).
    residuals = np.log1p(np.array([10.0, 100.0, 1000.0])) - np.log1p(100.0)
    left = expected_remaining(np.log1p([100.0]), residuals, [20])[0]
    assert left == pytest.approx((80.0 + 980.0) / 2, rel=0.05)  # the 10-token outcome is ruled out
    no_slot = {"slot_free": False, "free_blocks": 40, "needed_blocks": 2, "total_blocks": 100, "cfg": SRPT}
    early = RunningChat("early", 100.0, 20, 2)
    # Unrefreshed: 80 left is under twice a 50-token request's need; refreshed: ~530 left is over
    # twice its expected need (~190: it too may be 10x its median).
    assert preemption_victim(50.0, [early], **no_slot) is None
    wanted = expected_remaining(np.log1p([50.0]), residuals, [0])[0]
    refreshed = RunningChat("early", 100.0, 20, 2, left)
    assert 150.0 < wanted < 250.0 and preemption_victim(wanted, [refreshed], **no_slot) == "early"
    # A point distribution (every residual 0) refreshes to exactly prediction minus generated.
    assert expected_remaining(np.log1p([100.0]), np.zeros(5), [20])[0] == pytest.approx(80.0)
    # The engine pass takes residuals from the predictor at the config's path; without one it
    # runs unrefreshed (and says so in the log), never failing the engine.
    assert LimitedPreemption.from_config(SRPT).residuals is None
    # "a" (level of 100 tokens: 89.5 decoded) is 20 tokens in; "short" waits (40: 37 decoded).
    def engine():
        return _Engine([_chat("short", 40, arrival=1.0)], [_chat("a", 100, out=20), _chat("b", 8, out=1)],
                       free_blocks=50)

    refreshing = engine()
    assert LimitedPreemption(SRPT, residuals).apply(refreshing, 0.0) == 1 and refreshing.preempted == ["a"]
    plain = engine()
    assert LimitedPreemption(SRPT).apply(plain, 0.0) == 0  # unrefreshed: 69.5 left < 2 x 38


def test_load_residuals_reads_only_the_residuals_and_names_a_missing_artifact(tmp_path):
    from latency_model.length.predictor import LengthModelError, load_residuals

    with pytest.raises(LengthModelError, match="predictor.npz"):
        load_residuals(tmp_path)
    np.savez_compressed(tmp_path / "predictor.npz", residuals=np.array([0.3, -0.2, 0.0]), coef=np.zeros(3))
    assert load_residuals(tmp_path).tolist() == [-0.2, 0.0, 0.3]


class _Engine:
    """A scheduler view with chat requests as dicts."""

    block_size, max_num_seqs = 16, 2

    def __init__(self, waiting, running, free_blocks):
        self._waiting, self._running, self.free = waiting, running, free_blocks
        self.preempted = []

    def waiting(self):
        return list(self._waiting)

    def running(self):
        return list(self._running)

    priority = staticmethod(lambda r: r["priority"])
    request_id = staticmethod(lambda r: r["id"])
    arrival_time_s = staticmethod(lambda r: r["arrival"])
    context_tokens = staticmethod(lambda r: r["context"])
    num_output_tokens = staticmethod(lambda r: r["out"])
    tokens_to_admit = staticmethod(lambda r: r["context"])

    def num_free_blocks(self):
        return self.free

    def num_total_blocks(self):
        return 100

    def preempt(self, r, now_s):
        self._running.remove(r)
        self._waiting.append(r)
        self.preempted.append(r["id"])


def _chat(rid, tokens, out=0, context=64, arrival=0.0):
    return {"id": rid, "priority": vllm_priority(RequestClass.ONLINE, priority_level(tokens, 1.0, SRPT)),
            "arrival": arrival, "context": context, "out": out}


def test_the_engine_pass_preempts_one_long_chat_request_per_step_and_remembers_its_prediction():
    from orchestrator.engine.order import LimitedPreemption

    long_a, long_b = _chat("a", 1000, out=3), _chat("b", 600, out=2)
    engine = _Engine([_chat("short", 10, arrival=1.0)], [long_a, long_b], free_blocks=50)
    lp = LimitedPreemption(SRPT)
    assert lp.apply(engine, 0.0) == 1 and engine.preempted == ["a"]  # both slots were taken
    # "a" waits again at its arrival level; the short one now has a slot: nothing more this step.
    assert lp.apply(engine, 0.0) == 0
    # Aging lowers the level "a" waits at; what it was predicted to need is remembered.
    long_a["priority"] = vllm_priority(RequestClass.ONLINE, 0)
    engine._waiting.remove(long_a)
    engine._running.append(long_a)
    assert lp.levels["a"] == priority_level(1000, 1.0, SRPT)
    engine._waiting.append(_chat("short2", 10, arrival=2.0))
    engine._running.remove(engine._running[0])  # "b" is replaced by a third long request
    engine._running.append(_chat("c", 800, out=1))
    assert lp.apply(engine, 0.0) == 1 and engine.preempted == ["a", "c"]  # "a" only once
    # A request that aged (or was promoted) to level 0 is still as long as it was predicted:
    # waiting at the head, it preempts nothing shorter than twice its prediction.
    aged_long = _chat("aged", 1000, arrival=3.0)
    aged_long["priority"] = vllm_priority(RequestClass.ONLINE, 0)
    engine3 = _Engine([aged_long], [_chat("y", 300, out=1), _chat("z", 300, out=1)], free_blocks=50)
    engine3_lp = LimitedPreemption(SRPT)
    engine3_lp.levels["aged"] = priority_level(1000, 1.0, SRPT)
    assert engine3_lp.apply(engine3, 0.0) == 0
    # Offline work holds the room a waiting chat request needs: its preemption comes first.
    offline = {"id": "off", "priority": vllm_priority(RequestClass.OFFLINE), "arrival": 0.0, "context": 64, "out": 0}
    engine2 = _Engine([_chat("short", 10)], [_chat("x", 1000), offline], free_blocks=50)
    assert LimitedPreemption(SRPT).apply(engine2, 0.0) == 0
