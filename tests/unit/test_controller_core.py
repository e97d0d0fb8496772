"""The controller's loop logic without Ray: injected clock and checkpoint store, a real SLO file."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest

from orchestrator.config import PolicyConfig
from orchestrator.control.controller import ControllerCore
from orchestrator.control.slo import SloError, apply_setting, load_slo

ROOT = Path(__file__).resolve().parents[2]

SLO_YAML = textwrap.dedent("""\
    kind: ColocateSLO
    version: 1
    models:
      m:
        ttft_p99_ms: 400
        tpot_p99_ms: 50
        headroom: 0.1
""")


class MemoryStore:
    def __init__(self):
        self.data = None

    def get(self):
        return self.data

    def put(self, data):
        self.data = data


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def report(clock, rid="r1", **kw):
    base = dict(replica_id=rid, reported_at_s=clock(), received_at_s=clock(), num_online_running=0, num_online_waiting=0,
                num_offline_running=0, num_offline_paused=0, num_offline_waiting=0)
    base.update(kw)
    return base


@pytest.fixture
def setup(tmp_path):
    slo = tmp_path / "slo.yaml"
    slo.write_text(SLO_YAML)
    clock, store = Clock(), MemoryStore()
    admission_totals = []

    def make():
        return ControllerCore(model_id="m", slo_path=str(slo), clock=clock, store=store, metrics=False,
                              admission=admission_totals.append)

    return make, slo, clock, store


def test_tick_decides_a_budget_per_fresh_replica_and_replies_with_it(setup):
    make, _, clock, _ = setup
    c = make()
    c.reports["r1"] = report(clock)
    c.reports["old"] = report(clock, rid="old", received_at_s=clock() - 10)
    decision = c.tick()
    assert set(decision.replicas) == {"r1"}
    reply = asyncio.run(c.report(report(clock)))
    assert reply["max_offline_seqs"][:2] == [8, 2]  # no latency model: the conservative default
    assert reply["expires_in_s"] == c.silence_timeout_s


def test_a_controller_whose_ticks_fail_leaves_replicas_at_the_safe_budget_within_the_timeout(setup, tmp_path):
    """The budget's validity runs from when it was decided: the controller keeps answering with
    its last stored budget while ticks fail, and that budget must expire silence_timeout_s after
    it was decided (it used to be re-stamped with a fresh validity at every reply, forever)."""
    from orchestrator.control.reply import remaining_validity_s, reply_budget
    from orchestrator.engine.budget import OfflineBudget
    from orchestrator.engine.channel import EngineChannel

    make, _, clock, _ = setup
    c = make()
    c.reports["r1"] = report(clock)
    c.tick()
    chan = EngineChannel.create(tmp_path / "chan", fallback=OfflineBudget.flat(1, 64))

    def replica_round(elapsed_s: float = 0.01):
        """What the replica does with a reply: write it with the validity left, if any."""
        reply = asyncio.run(c.report(report(clock)))
        valid_for_s = remaining_validity_s(reply, elapsed_s)
        if valid_for_s > 0:
            chan.write_budget(reply_budget(reply), valid_for_s=valid_for_s, now_s=clock())

    replica_round()
    assert chan.budget_at(0, clock()) == (8, 512, False)

    def broken_tick():
        raise RuntimeError("observe failed")

    c.tick = broken_tick  # every later tick fails; the replica keeps reporting every 0.1 s
    deadline = clock() + c.silence_timeout_s
    while clock() <= deadline + 0.5:
        clock.t += 0.1
        replica_round()
    assert chan.budget_at(0, clock()) == (1, 64, True)
    chan.close(unlink=True)


def test_throttle_state_survives_a_restart_through_the_checkpoint(setup):
    make, _, clock, store = setup
    c = make()
    c.reports["r1"] = report(clock, num_online_running=3, observed_tpot_p99_ms=52.0)
    c.tick()
    assert c.state["r1"].throttle == "throttled" and c.state["r1"].scale == 0.5
    restarted = make()
    assert restarted.restored
    assert restarted.state["r1"] == c.state["r1"]


def test_slo_edits_apply_on_the_next_tick_and_invalid_ones_keep_the_last_good(setup, caplog):
    make, slo, clock, _ = setup
    c = make()
    c.reports["r1"] = report(clock)
    c.tick()
    assert c.slo.targets("m").tpot_p99_ms == 50
    slo.write_text(SLO_YAML.replace("tpot_p99_ms: 50", "tpot_p99_ms: 80"))
    with caplog.at_level("WARNING"):
        c.tick()
    assert c.slo.targets("m").tpot_p99_ms == 80
    assert "models.m.tpot_p99_ms: 50.0 -> 80.0" in caplog.text
    for bad, reason in [
        (SLO_YAML.replace("tpot_p99_ms: 50", "tpot_p99_ms: -5"), "models.m.tpot_p99_ms"),
        (SLO_YAML.replace("tpot_p99_ms: 50", "tpot_p99_ms: fast"), "models.m.tpot_p99_ms"),
        (SLO_YAML.replace("headroom: 0.1", "headroom: 0.1\n    colour: red"), "models.m.colour"),
        (SLO_YAML.replace("  m:", "  other:"), "no targets for the served model 'm'"),
        ("models: [unclosed", "not valid YAML"),
    ]:
        slo.write_text(bad)
        c.tick()
        assert reason in c.slo.last_error, (bad, c.slo.last_error)
        assert "keeping the last good targets" in c.slo.last_error
        assert c.slo.targets("m").tpot_p99_ms == 80
    slo.unlink()
    c.tick()
    assert "file not found" in c.slo.last_error and c.slo.targets("m").tpot_p99_ms == 80
    # A restarted controller starts from the last good targets even with the file still gone.
    assert make().slo.targets("m").tpot_p99_ms == 80


def test_status_rows_carry_budget_latency_and_throttle_state(setup):
    make, _, clock, _ = setup
    c = make()
    c.reports["r1"] = report(clock, num_online_running=2, observed_tpot_p99_ms=20.0, observed_ttft_p99_ms=90.0)
    c.tick()
    (row,) = c.status_snapshot()["replicas"]
    assert row["online_requests"] == 2 and row["offline_budget_seqs"] == 2  # the k >= 1 entry
    assert row["observed_tpot_p99_ms"] == 20.0 and row["slo_tpot_p99_ms"] == 50
    assert row["throttle"] == "open"


def test_slo_set_validates_before_writing(tmp_path):
    slo = load_slo_text(tmp_path)
    assert apply_setting(slo, "tpot_p99_ms=75").models["m"].tpot_p99_ms == 75
    assert apply_setting(slo, "m.headroom=0.2").models["m"].headroom == 0.2
    for bad, reason in [("tpot_p99_ms=0", "greater than 0"), ("colour=red", "models.m.colour"),
                        ("nope.tpot_p99_ms=3", "unknown model"), ("tpot_p99_ms", "KEY=VALUE"),
                        ("tpot_p99_ms=abc", "valid number")]:
        with pytest.raises(SloError, match=reason):
            apply_setting(slo, bad, {"m"})


def load_slo_text(tmp_path):
    p = tmp_path / "slo.yaml"
    p.write_text(SLO_YAML)
    return load_slo(p, {"m"})


def test_reports_feed_the_live_model_and_ticks_decide_with_the_model_in_force(setup):
    """Replicas' new engine steps go to the live fitter; once it has fit, decisions use the live
    model (no model at all before: the documented default budget)."""
    import numpy as np

    from orchestrator.control.controller import ControllerCore

    make, slo, clock, store = setup
    c = ControllerCore(model_id="m", slo_path=str(slo), clock=clock, store=store, metrics=False,
                       admission=lambda total: None, learn_online=True)
    rng = np.random.default_rng(0)
    n = 300
    decodes = rng.integers(1, 24, size=n).astype(float)
    steps = {"num_prefill_tokens": [0.0] * n, "num_prefill_reqs": [0.0] * n, "prefill_context_tokens": [0.0] * n,
             "prefill_attention_tokens2": [0.0] * n, "num_decode_reqs": decodes.tolist(),
             "decode_context_tokens": (decodes * 100).tolist(), "max_decode_context_tokens": [100.0] * n,
             "step_latency_ms": (5.0 + 0.5 * decodes).tolist()}
    asyncio.run(c.report(report(clock, new_steps=steps)))
    assert c.fitter.num_steps == n and "new_steps" not in c.reports["r1"]
    assert c.model_in_force is None and c.tick().replicas["r1"].budget.at(0) == (8, 512)
    c.fitter.refit(None)
    assert c.model_status()["source"] == "live" and c.model_status()["num_live_steps"] == n
    d = c.tick().replicas["r1"]
    assert d.predicted_step_ms is not None  # decided with the live model


def test_the_policy_state_does_not_move_while_an_override_pins_the_budget(setup):
    """What clients see under an override is the pinned budget's doing: a chat-alone reference at
    budget 0 (TPOT far under the SLO) must not cut or grow the policy's state, and control
    returns to the policy where it left off."""
    make, _, clock, _ = setup
    c = make()
    c.reports["r1"] = report(clock, num_online_running=2, observed_tpot_p99_ms=49.0)
    c.set_override({"max_offline_seqs": [0], "max_offline_tokens": [0]})
    for _ in range(40):
        clock.t += 0.25
        c.reports["r1"]["received_at_s"] = clock()
        c.tick()
    assert "r1" not in c.state
    c.set_override(None)
    c.tick()
    assert c.state["r1"].throttle == "throttled"  # the policy's own reading of the same signal


def test_a_report_is_fresh_by_when_it_arrived_not_by_its_senders_clock(setup):
    """A replica on another node stamps its report with that host's wall clock; two hosts'
    clocks need not agree, so freshness is judged on the controller's own clock."""
    make, _, clock, _ = setup
    c = make()
    skewed = report(clock, rid="far", reported_at_s=clock() - 3600.0)  # an hour behind
    del skewed["received_at_s"]
    c.receive(skewed)
    assert c.reports["far"]["received_at_s"] == clock()
    assert set(c.tick().replicas) == {"far"}
    clock.t += 10.0  # no report for 10 s: stale, whatever the sender's clock said
    assert c.tick().replicas == {}


def test_sequence_candidates_follow_the_offline_slots_engines_report_unless_the_operator_set_them(setup, tmp_path):
    """The default candidates stop at 64; engines of 256 slots leave offline work 192 (a quarter
    kept for chat): the controller asks its model about as many as the largest engine reported.
    Candidates the operator set stay as set; engines not yet reporting their slots change nothing."""
    from orchestrator.control.policy import seq_candidates_to

    make, slo, clock, store = setup
    default = PolicyConfig().seq_candidates
    assert default[-1] == 64
    assert seq_candidates_to(default, 24) == default
    assert seq_candidates_to(default, 96)[len(default):] == (96,)
    assert seq_candidates_to(default, 192)[len(default):] == (96, 128, 192)
    assert seq_candidates_to(default, 700)[len(default):] == (96, 128, 192, 256, 384, 512, 700)

    c = make()
    c.reports["r1"] = report(clock)  # slots not reported yet
    c.tick()
    assert c.policy.seq_candidates == default
    c.reports["r1"] = report(clock, max_num_seqs=32)
    c.reports["r2"] = report(clock, rid="r2", max_num_seqs=256)
    c.tick()
    assert c.policy.seq_candidates == (*default, 96, 128, 192)
    assert c.policy.model_dump(exclude={"seq_candidates"}) == PolicyConfig().model_dump(exclude={"seq_candidates"})

    own = ControllerCore(model_id="m", slo_path=str(slo), clock=clock, store=MemoryStore(), metrics=False,
                         admission=lambda total: None, policy={"seq_candidates": [0, 1, 8]})
    own.reports["r2"] = report(clock, rid="r2", max_num_seqs=256)
    own.tick()
    assert own.policy.seq_candidates == (0, 1, 8)


def test_serve_application_args_keep_what_the_file_left_unset():
    """`config_from_args` merges inline config over the file's: a full dump would mark every
    default as set, and the controller would take default candidates for the operator's own."""
    from orchestrator.serving.app import config_from_args

    config, _ = config_from_args({"config_path": "manifests/colocate-gpu.yaml", "base_dir": str(ROOT),
                                  "config": {"cluster": {"address": "auto"}}})
    assert config.cluster.address == "auto"
    assert "seq_candidates" not in config.controller.policy.model_fields_set
    assert config.replicas.engine_kwargs["max_num_seqs"] == 256
