"""The controller's pure decision, driven with hand-built snapshots and an injected clock."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from latency_model.features import FEATURE_NAMES
from orchestrator.control.policy import PolicyConfig, ReplicaLoad, ReplicaState, SloTargets, Snapshot, decide

SLO = SloTargets(ttft_p99_ms=400.0, tpot_p99_ms=50.0, headroom=0.1)
CFG = PolicyConfig()
PROBING = PolicyConfig(max_probe=4.0)
WIDE = PolicyConfig(calibration_bounds=(0.05, 20.0))
IDX = {n: i for i, n in enumerate(FEATURE_NAMES)}


class LinearModel:
    """Step p99 = 10 ms + 2 ms per decode request + 0.05 ms per prefill token (p50 = 80%)."""

    def predict_ms(self, x):
        p99 = 10.0 + 2.0 * x[:, IDX["num_decode_reqs"]] + 0.05 * x[:, IDX["num_prefill_tokens"]]
        return 0.8 * p99, p99


def snap(now, **load):
    return Snapshot(now_s=now, slo=SLO, replicas=(ReplicaLoad("r1", **load),))


def test_budget_is_the_largest_batch_the_model_predicts_under_the_step_target():
    d = decide(snap(0.0), {}, LinearModel()).replicas["r1"]
    # Target 45 ms against the median head (a TPOT is the mean of a request's steps): k online +
    # s offline decodes beside a 32-token chunk fit while 8 + 1.6(k + s) + 1.28 <= 45, i.e.
    # k + s <= 22.
    assert d.target_step_ms == 45.0
    assert d.budget.max_offline_seqs[1] == 16  # 21 would fit; the candidates are 16 and 24
    assert d.budget.max_offline_seqs[9] == 12  # 13 would fit; the candidates are 12 and 16
    # Beside 22 online decodes a chunk leaves room for no offline decode, but one decode alone
    # fits (8 + 1.6 * 23 = 44.8): the row runs that decode (a chunk needs a sequence).
    assert d.budget.at(22) == (1, 1)
    # 23 online decodes alone take 44.8 ms: one offline decode more would be 46.4.
    assert d.budget.max_offline_seqs[23] == 0
    # With no chat in the engine a step may take a quarter of the TTFT target less headroom
    # (90 ms), held against the p99 head (that one step delays a chat first token, a tail
    # target): 32 decodes (74 ms) and a 256-token chunk (12.8 ms).
    assert d.budget.at(0) == (32, 32 + 256)
    assert list(d.budget.max_offline_seqs) == sorted(d.budget.max_offline_seqs, reverse=True)


def test_a_profiled_step_budget_is_a_step_p99_and_is_held_against_the_p99_head():
    profiled = Snapshot(now_s=0.0, slo=SLO, replicas=(ReplicaLoad("r1"),), step_budget_ms=50.0)
    d = decide(profiled, {}, LinearModel()).replicas["r1"]
    # 10 + 2(k + s) + 1.6 <= 45: k + s <= 16.
    assert d.target_step_ms == 45.0
    assert d.budget.max_offline_seqs[1] == 12  # 15 would fit; the candidates are 12 and 16
    assert d.budget.max_offline_seqs[5] == 8
    # k = 16: no decode beside the minimal 32-token chunk, one beside a 16-token chunk
    # (10 + 2 * 17 + 0.8 = 44.8); k = 17: none.
    assert d.budget.at(16) == (1, 17) and d.budget.max_offline_seqs[17] == 0


def test_offline_work_never_takes_the_sequence_slots_kept_for_chat():
    # The model allows 32 offline sequences at k = 0 (above), the default budget 8; an engine of
    # 16 (then 4) slots keeps a quarter of them for chat at every online load.
    for model, num_slots, expected in ((LinearModel(), 16, 12), (None, 4, 3)):
        d = decide(snap(0.0, max_num_seqs=num_slots), {}, model).replicas["r1"]
        assert max(d.budget.max_offline_seqs) == d.budget.at(0)[0] == expected
    # Unknown slots (no step seen yet): no cap beyond the model's.
    assert decide(snap(0.0), {}, LinearModel()).replicas["r1"].budget.at(0)[0] == 32


def test_no_model_means_the_documented_conservative_default():
    d = decide(snap(0.0), {}, None).replicas["r1"]
    assert d.budget.at(0) == (CFG.default_idle_offline_seqs, CFG.default_idle_offline_tokens)
    assert set(d.budget.max_offline_seqs[1:]) == {CFG.default_offline_seqs}
    assert set(d.budget.max_offline_tokens[1:]) == {CFG.default_offline_tokens}


def test_observed_tpot_near_the_slo_cuts_the_budget_at_once_and_it_grows_back_gradually():
    model = LinearModel()
    state = {}
    full = decide(snap(0.0), state, model).replicas["r1"].budget.max_offline_seqs[0]
    hot = decide(snap(1.0, num_online=4, observed_tpot_p99_ms=52.0), state, model).replicas["r1"]
    assert hot.state.throttle == "throttled" and hot.state.scale == 0.5
    assert hot.budget.max_offline_seqs[0] == full // 2
    # Still hot 0.3 s later: held (the observation window has not caught up), not collapsed.
    state = {"r1": hot.state}
    again = decide(snap(1.3, num_online=4, observed_tpot_p99_ms=52.0), state, model).replicas["r1"]
    assert again.state.scale == 0.5
    # The same pressure within shrink_hold_s is the same evidence (the requests that saw the old
    # budget are still in the window): no second cut. A higher one is new: cut again. Still hot
    # after shrink_hold_s: cut again.
    state = {"r1": again.state}
    late = decide(snap(1.0 + 0.9 * CFG.shrink_hold_s, num_online=4, observed_tpot_p99_ms=52.0), state, model)
    assert late.replicas["r1"].state.scale == 0.5
    worse = decide(snap(1.0 + CFG.min_recut_s, num_online=4, observed_tpot_p99_ms=60.0), state, model)
    assert worse.replicas["r1"].state.scale == 0.25
    later = decide(snap(1.0 + CFG.shrink_hold_s, num_online=4, observed_tpot_p99_ms=52.0), state, model)
    assert later.replicas["r1"].state.scale == 0.25
    # Calm: grows by one step per grow_hold_s, never in one jump: first back to the level the
    # episode's first cut set (0.5: the deeper cut answered partly older evidence), undoing one
    # cut per step, then by grow_step.
    state = {"r1": later.replicas["r1"].state}
    assert state["r1"].recover_to == 0.5
    t, scales = 2.0, []
    for _ in range(int(12 * CFG.grow_hold_s / 0.5)):
        d = decide(snap(t, num_online=1, observed_tpot_p99_ms=20.0), state, model).replicas["r1"]
        state = {"r1": d.state}
        scales.append(d.state.scale)
        t += 0.5
    assert scales[0] == 0.25
    growths = [i for i in range(1, len(scales)) if scales[i] > scales[i - 1]]
    assert all((b - a) * 0.5 >= CFG.grow_hold_s for a, b in zip(growths, growths[1:]))
    assert scales[growths[0]] == 0.5
    assert all(b - a <= CFG.grow_step + 1e-9 for a, b in zip(scales[growths[0]:], scales[growths[0] + 1:]))
    assert scales[-1] == 1.0 and state["r1"].throttle == "open"


def test_the_same_slow_requests_seen_again_do_not_deepen_a_cut_and_a_new_episode_recovers_to_its_own_level():
    """A window p99 a hair above the one a cut answered (the same requests, a running one's TPOT
    creeping up) is not a deeper overload; one `recut_margin` higher is. Fast recovery returns
    to the level the episode's first cut set; a cut while recovering starts a new episode whose
    level is half of where it struck."""
    model = LinearModel()
    cfg = PolicyConfig(shrink_hold_s=10.0)  # two windows, as manifests/colocate-bench-learned.yaml
    hot = decide(snap(1.0, num_online=4, observed_tpot_p99_ms=52.0), {}, model, cfg).state
    assert hot["r1"].scale == 0.5 and hot["r1"].recover_to == 0.5
    creep = 52.0 * (1.0 + 0.9 * cfg.recut_margin)
    same = decide(snap(1.0 + cfg.min_recut_s, num_online=4, observed_tpot_p99_ms=creep), hot, model, cfg).state
    assert same["r1"].scale == 0.5
    deeper = decide(snap(1.0 + cfg.min_recut_s, num_online=4,
                         observed_tpot_p99_ms=52.0 * (1.0 + 1.1 * cfg.recut_margin)), hot, model, cfg).state
    assert deeper["r1"].scale == 0.25 and deeper["r1"].recover_to == 0.5
    # Calm: 0.25 -> 0.5 in one growth step, then one grow_step at a time.
    state, t, scales = deeper, 3.0, []
    while t < 3.0 + 3.5 * cfg.grow_hold_s:
        state = decide(snap(t, num_online=1, observed_tpot_p99_ms=20.0), state, model, cfg).state
        scales.append(state["r1"].scale)
        t += 0.25
    assert sorted(set(scales)) == [0.25, 0.5, 0.5 + cfg.grow_step, 0.5 + 2 * cfg.grow_step]
    # Hot again while recovering: a new episode, recovering to half of 0.75.
    again = decide(snap(t, num_online=4, observed_tpot_p99_ms=52.0), state, model, cfg).state
    assert again["r1"].scale == again["r1"].recover_to == 0.375
    # Without fast recovery, every growth step is grow_step.
    slow = PolicyConfig(shrink_hold_s=10.0, fast_recovery=False)
    state, scales = deeper, []
    for i in range(12):
        state = decide(snap(3.0 + 0.25 * i, num_online=1, observed_tpot_p99_ms=20.0), state, model, slow).state
        scales.append(state["r1"].scale)
    rises = [b - a for a, b in zip(scales, scales[1:]) if b > a]
    assert rises and all(abs(r - slow.grow_step) < 1e-9 for r in rises)


def test_steady_load_inside_the_band_does_not_oscillate_and_a_cut_budget_still_recovers():
    model = LinearModel()
    state = {"r1": ReplicaState(scale=0.5, throttle="throttled", last_change_s=0.0, recover_to=0.5)}
    scales = []
    for i in range(int(5 * CFG.band_grow_hold_s / 0.25)):  # 250 ms ticks, TPOT steady at 0.85 of the SLO
        d = decide(snap(1.0 + 0.25 * i, num_online=3, observed_tpot_p99_ms=0.85 * SLO.tpot_p99_ms), state, model)
        state = d.state
        scales.append(d.replicas["r1"].state.scale)
    # Never cut again, one grow step per band_grow_hold_s (slower than when calm), back to full.
    assert scales == sorted(scales)
    steps = [i for i in range(1, len(scales)) if scales[i] > scales[i - 1]]
    assert all(b - a >= CFG.band_grow_hold_s / 0.25 for a, b in zip(steps, steps[1:]))
    assert scales[-1] == 1.0 and len(steps) == round(0.5 / CFG.grow_step)


def test_a_cut_halves_what_runs_even_where_the_slots_cap_the_model():
    """The scale multiplies the budget after the slot cap: with the model allowing 32 offline
    sequences and the engine 12 offline slots, a cut runs 6, not min(16, 12) = 12."""
    model = LinearModel()
    full = decide(snap(0.0, max_num_seqs=16), {}, model).replicas["r1"]
    assert full.budget.at(0)[0] == 12
    hot = decide(snap(1.0, max_num_seqs=16, observed_tpot_p99_ms=52.0), {}, model).replicas["r1"]
    assert hot.state.scale == 0.5 and hot.budget.at(0)[0] == 6


def test_operator_caps_bound_the_budget():
    capped = Snapshot(now_s=0.0, slo=SloTargets(400.0, 50.0, 0.1, max_offline_seqs=3, max_offline_tokens=8),
                      replicas=(ReplicaLoad("r1"),))
    b = decide(capped, {}, LinearModel()).replicas["r1"].budget
    assert max(b.max_offline_seqs) == 3 and max(b.max_offline_tokens) == 8


def test_a_batch_predicted_over_the_target_is_reported_but_only_what_clients_saw_cuts_the_scale():
    # Chat arrived beside the idle row's offline work: 10 chat + 14 running offline decodes
    # predict 8 + 1.6 * 24 = 46.4 ms (median head) against the 45 ms target. The engine runs the
    # k = 10 row (12 offline decodes) from the next step on; cutting the scale for this one step
    # would also cut every other row.
    model = LinearModel()
    d = decide(snap(0.0, num_online=10, online_context_tokens=1000.0, num_offline_running=14,
                    offline_context_tokens=1400.0), {}, model).replicas["r1"]
    assert d.predicted_step_ms == pytest.approx(46.4)
    assert d.state.throttle == "open" and d.state.scale == 1.0
    assert d.budget.max_offline_seqs[10] == 12
    seen = decide(snap(0.0, num_online=10, online_context_tokens=1000.0, num_offline_running=14,
                       offline_context_tokens=1400.0, observed_ttft_p99_ms=390.0), {}, model).replicas["r1"]
    assert seen.pressure == pytest.approx(390.0 / 400.0) and seen.state.throttle == "throttled"


def test_state_round_trips_through_json_for_the_checkpoint():
    s = ReplicaState(scale=0.25, throttle="recovering", last_change_s=12.5, calm_since_s=11.0)
    assert ReplicaState.from_json(s.to_json()) == s
    assert ReplicaState.from_json(ReplicaState().to_json()) == ReplicaState()


def test_a_noisy_non_monotone_model_never_yields_a_budget_above_a_failing_candidate():
    class Bumpy(LinearModel):
        def predict_ms(self, x):
            p50, p99 = super().predict_ms(x)
            bump = np.where(x[:, IDX["num_decode_reqs"]] == 6, 100.0, 0.0)
            return p50 + bump, p99 + bump

    b = decide(snap(0.0), {}, Bumpy()).replicas["r1"].budget
    assert b.max_offline_seqs[0] == 4  # 6 fails, so nothing past it counts


def _steps(num_decode: list[int], latency_ms: list[float]) -> dict[str, list[float]]:
    n = len(num_decode)
    return {"num_prefill_tokens": [0.0] * n, "num_prefill_reqs": [0.0] * n, "prefill_context_tokens": [0.0] * n,
            "prefill_attention_tokens2": [0.0] * n, "num_decode_reqs": [float(d) for d in num_decode],
            "decode_context_tokens": [100.0 * d for d in num_decode],
            "max_decode_context_tokens": [100.0] * n, "step_latency_ms": latency_ms}


def test_steps_running_slower_than_predicted_shrink_the_budget_by_the_observed_ratio():
    model = LinearModel()
    bare = decide(snap(0.0), {}, model).replicas["r1"]
    # Recent steps took 1.5x the model's median (0.8 * (10 + 2 d)): the replica is serving.
    decodes = [4, 8, 12, 16, 20, 24, 28, 32, 8, 8]
    slow = _steps(decodes, [1.5 * 0.8 * (10 + 2 * d) for d in decodes])
    served = decide(snap(0.0, recent_steps=slow), {}, model).replicas["r1"]
    assert served.calibration == pytest.approx(1.5)
    # Target 45 ms: k + s decodes plus a 32-token chunk fit while 1.5 (9.28 + 1.6(k + s)) <= 45.
    assert served.budget.max_offline_seqs[1] == 8 < bare.budget.max_offline_seqs[1]
    assert all(a <= b for a, b in zip(served.budget.max_offline_seqs, bare.budget.max_offline_seqs))


def test_calibration_needs_enough_steps_and_stays_within_its_bounds():
    model = LinearModel()
    few = decide(snap(0.0, recent_steps=_steps([4, 8], [500.0, 500.0])), {}, model).replicas["r1"]
    assert few.calibration == 1.0
    decodes = [4] * 12
    wild = decide(snap(0.0, recent_steps=_steps(decodes, [1000.0] * 12)), {}, model).replicas["r1"]
    assert wild.calibration == CFG.calibration_bounds[1]
    fast = decide(snap(0.0, recent_steps=_steps(decodes, [1.0] * 12)), {}, model).replicas["r1"]
    assert fast.calibration == CFG.calibration_bounds[0]
    # Wide bounds (for the live model) match a host 14x faster than the model's.
    faster = decide(snap(0.0, recent_steps=_steps(decodes, [1.0] * 12)), {}, model, WIDE).replicas["r1"]
    assert faster.calibration == pytest.approx(1.0 / 14.4)


def test_the_calibration_is_smoothed_over_time_not_ticks_and_the_first_measurement_is_taken_whole():
    model = LinearModel()
    every_tick = PolicyConfig(calibration_every_s=0.0)
    decodes = [4, 8, 12, 16, 20, 24, 28, 32, 8, 8]
    at = lambda ratio: _steps(decodes, [ratio * 0.8 * (10 + 2 * d) for d in decodes])  # noqa: E731
    first = decide(snap(10.0, recent_steps=at(1.5)), {}, model).replicas["r1"]
    assert first.calibration == pytest.approx(1.5) and first.state.calibration == pytest.approx(1.5)
    # A noisy tick 100 ms later (a median over another mix of steps) moves it by 2% of the way.
    state = {"r1": first.state}
    noisy = decide(snap(10.1, recent_steps=at(1.0)), state, model, every_tick).replicas["r1"]
    tau = CFG.calibration_smoothing_s
    expected = 1.5 + (1.0 - 1.5) * (1.0 - np.exp(-0.1 / tau))
    assert noisy.calibration == pytest.approx(expected) and noisy.calibration > 1.48
    # A lasting change (the host got faster) is followed within a few time constants, at any tick rate.
    for ticks, dt in ((10 * int(tau), 0.5), (50 * int(tau), 0.1)):
        state, t = {"r1": first.state}, 10.0
        for _ in range(ticks):
            t += dt
            state = decide(snap(t, recent_steps=at(1.0)), state, model, every_tick).state
        assert state["r1"].calibration == pytest.approx(1.0 + 0.5 * np.exp(-ticks * dt / tau), rel=1e-6)
    # Ticks without enough steps keep the last calibration (and its time).
    kept = decide(snap(20.0), {"r1": first.state}, model).replicas["r1"]
    assert kept.calibration == pytest.approx(1.5) and kept.state.calibration_at_s == 10.0
    # 0: no smoothing.
    raw = decide(snap(10.1, recent_steps=at(1.0)), {"r1": first.state}, model,
                 PolicyConfig(calibration_smoothing_s=0.0, calibration_every_s=0.0)).replicas["r1"]
    assert raw.calibration == pytest.approx(1.0)


def test_each_replica_is_calibrated_once_a_period_and_the_fleet_spread_over_it():
    from orchestrator.control.policy import CALIBRATION_GROUPS, GridCache

    model = LinearModel()
    decodes = [4, 8, 12, 16, 20, 24, 28, 32, 8, 8]
    steps = _steps(decodes, [1.2 * 0.8 * (10 + 2 * d) for d in decodes])
    ids = [f"replica-{i}" for i in range(64)]
    cache, state, counts = GridCache(), {}, []
    measured_at = {r: [] for r in ids}
    for tick in range(41):  # 10 s of 250-ms ticks
        now = 100.0 + 0.25 * tick
        snapshot = Snapshot(now_s=now, slo=SLO, replicas=tuple(ReplicaLoad(r, recent_steps=steps) for r in ids))
        state = decide(snapshot, state, model, CFG, cache).state
        fresh = [r for r in ids if state[r].calibration_at_s == now]
        counts.append(len(fresh))
        for r in fresh:
            measured_at[r].append(now)
    assert counts[0] == len(ids)  # the first measurement at once
    # Then every replica once per period, a group's share of the fleet per tick, not all at once.
    for times in measured_at.values():
        assert all(b - a == pytest.approx(CFG.calibration_every_s) for a, b in zip(times[1:], times[2:]))
        assert len(times) >= 10
    assert max(counts[8:]) < len(ids) // 2 and sum(counts[8:]) == pytest.approx(len(ids) * 8, abs=len(ids))
    assert len(cache.steps) == CALIBRATION_GROUPS
    assert all(s.calibration == pytest.approx(1.2) for s in state.values())


def test_the_tables_hold_through_small_moves_of_the_target_and_follow_large_ones():
    model = LinearModel()

    def at(headroom, state, cfg=CFG, **load):
        slo = SloTargets(ttft_p99_ms=400.0, tpot_p99_ms=50.0, headroom=headroom)
        return decide(Snapshot(now_s=1.0, slo=slo, replicas=(ReplicaLoad("r1", **load),)), state, model, cfg).replicas["r1"]

    # Target 37 ms: 16 offline decodes fit beside one chat request and a 32-token chunk
    # (8 + 1.6 x 17 + 1.28 = 36.5 ms).
    first = at(0.26, {})
    assert first.budget.max_offline_seqs[1] == 16 and first.state.held_target_ms == pytest.approx(37.0)
    # 36 ms (3% lower) alone gives 12; after the 37-ms tables it is held, and they stay.
    assert at(0.28, {}).budget.max_offline_seqs[1] == 12
    small = at(0.28, {"r1": first.state})
    assert small.budget == first.budget and small.state.held_target_ms == pytest.approx(37.0)
    # 30 ms (19% lower): rebuilt.
    large = at(0.40, {"r1": first.state})
    assert large.state.held_target_ms == pytest.approx(30.0) and large.budget.max_offline_seqs[1] == 8
    # A cut acts at once whatever is held; 0 switches the hold off.
    hot = at(0.28, {"r1": first.state}, observed_tpot_p99_ms=52.0)
    assert hot.state.scale == 0.5 and hot.budget.max_offline_seqs[1] == 8
    assert at(0.28, {"r1": first.state}, PolicyConfig(target_hysteresis=0.0)).budget.max_offline_seqs[1] == 12


def test_the_band_widens_with_the_calibration_noise_measured_on_the_host_and_holds_the_tables():
    from orchestrator.control.policy import hysteresis_band, hysteresis_band_of

    model = LinearModel()
    decodes = [4, 8, 12, 16, 20, 24, 28, 32, 8, 8]
    at = lambda ratio: _steps(decodes, [ratio * 0.8 * (10 + 2 * d) for d in decodes])  # noqa: E731

    def run(ratios):
        state, t = {}, 10.0
        for ratio in ratios:
            state = decide(snap(t, recent_steps=at(ratio)), state, model).state
            t += CFG.calibration_every_s
        return state["r1"]

    # A steady host: every measurement alike, no spread; the band is the floor.
    quiet = run([1.5] * 120)
    assert quiet.calibration_var == pytest.approx(0.0, abs=1e-12)
    assert hysteresis_band(np.array([quiet.calibration_var]), CFG)[0] == CFG.target_hysteresis
    # A noisy one: independent measurements spread 20% around 1.5 (relative variance 0.04; the
    # smoothed value stays near 1.5 and wanders a few percent); the band is wider than that
    # wander, within its cap.
    rng = np.random.default_rng(0)
    noisy = run((1.5 * (1.0 + 0.2 * rng.standard_normal(180))).tolist())
    assert 0.025 < noisy.calibration_var < 0.06 and abs(noisy.calibration - 1.5) < 0.15
    band = hysteresis_band(np.array([noisy.calibration_var]), CFG)[0]
    weight = 1.0 - np.exp(-CFG.calibration_every_s / CFG.calibration_smoothing_s)
    wander = np.sqrt(noisy.calibration_var * weight / (2.0 - weight))
    assert band == pytest.approx(CFG.hysteresis_noise_sigmas * wander) and CFG.target_hysteresis < band < 0.25
    assert hysteresis_band(np.array([10.0]), CFG)[0] == CFG.max_target_hysteresis
    for var in (0.0, noisy.calibration_var, 10.0):
        assert hysteresis_band_of(var, CFG) == pytest.approx(hysteresis_band(np.array([var]), CFG)[0])
    # A real change of speed (1.5 -> 3.0 and staying there) counts once, not at every
    # measurement until the smoothing catches up: the band stays far under its cap.
    moved = run([1.5] * 60 + [3.0] * 30)
    assert hysteresis_band(np.array([moved.calibration_var]), CFG)[0] < 0.1
    # The noise survives a checkpoint.
    restored = ReplicaState.from_json(noisy.to_json())
    assert (restored.calibration_var, restored.calibration_raw) == (noisy.calibration_var, noisy.calibration_raw)

    def tables(headroom, state):
        slo = SloTargets(ttft_p99_ms=400.0, tpot_p99_ms=50.0, headroom=headroom)
        return decide(Snapshot(now_s=1.0, slo=slo, replicas=(ReplicaLoad("r1"),)), state, model).replicas["r1"]

    # The target 6% lower (37 -> 35 ms) is over the floor: rebuilt on a quiet replica, held on a noisy one.
    first = tables(0.26, {})
    assert tables(0.30, {"r1": first.state}).state.held_target_ms == pytest.approx(35.0)
    held = tables(0.30, {"r1": dataclasses.replace(first.state, calibration_var=noisy.calibration_var)})
    assert held.state.held_target_ms == pytest.approx(37.0) and held.budget == first.budget


def test_a_cut_near_the_slo_is_graded_where_configured_and_a_missed_slo_halves():
    model = LinearModel()
    graded_cfg = PolicyConfig(full_cut_at=1.0)
    for observed_ms, expected in ((0.96 * SLO.tpot_p99_ms, CFG.grow_below / 0.96),  # 0.83
                                  (0.99 * SLO.tpot_p99_ms, CFG.grow_below / 0.99),
                                  (SLO.tpot_p99_ms, CFG.shrink_factor),
                                  (3.0 * SLO.tpot_p99_ms, CFG.shrink_factor)):
        d = decide(snap(1.0, num_online=2, observed_tpot_p99_ms=observed_ms), {}, model, graded_cfg).replicas["r1"]
        assert d.state.throttle == "throttled" and d.state.scale == pytest.approx(expected)
    # A graded cut never goes deeper than a full one, and the probes are cut by the same factor.
    deep = PolicyConfig(grow_below=0.2, probe_below=0.2, shrink_at=0.9, max_probe=4.0, full_cut_at=1.0)
    d = decide(snap(1.0, num_online=2, observed_tpot_p99_ms=0.95 * SLO.tpot_p99_ms),
               {"r1": ReplicaState(probe_tpot=3.0)}, model, deep).replicas["r1"]
    assert d.state.scale == deep.shrink_factor and d.state.probe_tpot == 1.5
    graded = decide(snap(1.0, num_online=2, observed_tpot_p99_ms=0.96 * SLO.tpot_p99_ms),
                    {"r1": ReplicaState(probe_tpot=3.0)}, model,
                    PolicyConfig(max_probe=4.0, full_cut_at=1.0)).replicas["r1"]
    assert graded.state.probe_tpot == pytest.approx(3.0 * CFG.grow_below / 0.96)
    # The default: every cut a full one.
    d = decide(snap(1.0, num_online=2, observed_tpot_p99_ms=0.96 * SLO.tpot_p99_ms), {}, model)
    assert CFG.full_cut_at is None and d.replicas["r1"].state.scale == CFG.shrink_factor
    with pytest.raises(ValueError, match="full_cut_at"):
        PolicyConfig(full_cut_at=0.9)


def test_offline_requests_paused_by_the_budget_do_not_count_as_running_work():
    # 4 chat + 4 running offline decodes: 8 + 1.6 * 8 = 20.8 ms; the 26 paused ones hold KV only.
    d = decide(snap(0.0, num_online=4, num_offline_running=30, num_offline_paused=26,
                    offline_context_tokens=3000.0, online_context_tokens=400.0), {}, LinearModel()).replicas["r1"]
    assert d.predicted_step_ms == pytest.approx(20.8)
    assert d.state.throttle == "open"


class SlowModel(LinearModel):
    """Every step over every target: a fixed 200 ms part."""

    def predict_ms(self, x):
        p50, p99 = super().predict_ms(x)
        return p50 + 200.0, p99 + 200.0


def test_a_model_with_no_room_anywhere_still_lets_one_offline_sequence_run_while_no_chat_is_in():
    d = decide(snap(0.0), {}, SlowModel()).replicas["r1"]
    assert d.budget.at(0) == (CFG.min_idle_offline_seqs, CFG.min_idle_offline_seqs + CFG.min_offline_chunk_tokens)
    assert set(d.budget.max_offline_seqs[1:]) == {0}
    # The feedback scale still cuts the floor when clients see the SLO approached.
    hot = decide(snap(1.0, observed_tpot_p99_ms=49.0), {"r1": ReplicaState(0.5, "throttled", 0.0)},
                 SlowModel()).replicas["r1"]
    assert hot.budget.at(0)[0] == 0
    off = decide(snap(0.0), {}, SlowModel(), PolicyConfig(min_idle_offline_seqs=0)).replicas["r1"]
    assert set(off.budget.max_offline_seqs) == {0}


class PrefillOverheadModel:
    """Median step = 10 ms + 1 ms per decode request + 20 ms if the step prefills at all (p99 =
    1.25x): a chunk of any size costs as much as 20 decodes."""

    def predict_ms(self, x):
        p50 = 10.0 + x[:, IDX["num_decode_reqs"]] + 20.0 * (x[:, IDX["num_prefill_tokens"]] > 0)
        return p50, 1.25 * p50


def test_rows_with_chat_drop_the_prefill_chunk_where_it_would_cost_most_of_the_decodes():
    d = decide(snap(0.0), {}, PrefillOverheadModel()).replicas["r1"]
    # Target 45 ms. k = 15: a chunk fits only with no offline decode beside it (30 + 15 = 45),
    # which is no offline work at all; without it 45 - 25 = 20 decodes fit (candidate 16).
    assert d.budget.at(15) == (16, 16)
    # k = 14: one decode beside a chunk, 16 without: decodes only.
    assert d.budget.at(14) == (16, 16)
    # k = 1: 12 beside a chunk, 32 without (34 fit): the chunk would cost more than half of them.
    assert d.budget.at(1) == (32, 32)
    # The idle row (target 90 ms against the p99 head: 1.25 (30 + s) <= 90, s <= 42) keeps its
    # chunk: offline prefills run there.
    seqs, tokens = d.budget.at(0)
    assert seqs == 32 and tokens > seqs


class NoisyLeafModel(LinearModel):
    """LinearModel with one noisy leaf: 1 offline decode beside a prefill chunk (and no chat)
    predicts 1000 ms, while 2 or 3 beside the same chunk fit. A tree model's prediction is not
    monotone in batch size; the table must come from the prefix of candidates that all fit."""

    def predict_ms(self, x):
        p50, p99 = super().predict_ms(x)
        noisy = (x[:, IDX["num_decode_reqs"]] == 1) & (x[:, IDX["num_prefill_tokens"]] > 0)
        return np.where(noisy, 1000.0, p50), np.where(noisy, 1000.0, p99)


def test_a_noisy_leaf_cannot_make_a_row_take_a_candidate_that_does_not_fit():
    """On the chunk axis the number of fitting candidates was used as an index without a prefix
    accumulation: with 1-decode-plus-chunk over the target and 2 and 3 under it, the idle row
    took '1 decode + the largest chunk', a batch the model itself put at 1000 ms."""
    d = decide(snap(0.0), {}, NoisyLeafModel()).replicas["r1"]
    # The with-chunk prefix breaks at s = 1, so the idle row is the largest decode batch that
    # fits (32: 74 ms against 90) with the largest chunk that fits beside those 32 decodes
    # (256 tokens: 86.8 ms). The old code took 24 decodes + a 512-token chunk.
    assert d.budget.at(0) == (32, 32 + 256)


def test_well_under_the_slo_the_targets_are_probed_upwards_and_a_cut_halves_the_probe():
    """Additive increase beyond the model while chat sits well under the SLO, bounded by
    max_probe; multiplicative decrease with the cut; no growth without a fresh observation.
    (Probing is opt-in: max_probe 1, the default, never probes.)"""
    model = LinearModel()
    state, t = {}, 0.0
    base = decide(snap(t, num_online=1, observed_tpot_p99_ms=10.0, observed_ttft_p99_ms=50.0), state, model, PROBING)
    first = base.replicas["r1"]
    probes = []
    for _ in range(80):
        t += CFG.probe_hold_s
        d = decide(snap(t, num_online=1, observed_tpot_p99_ms=10.0, observed_ttft_p99_ms=50.0), state, model, PROBING)
        state = {"r1": d.replicas["r1"].state}
        probes.append(state["r1"].probe_tpot)
    assert all(0 <= b - a <= CFG.probe_step + 1e-9 for a, b in zip(probes, probes[1:]))
    assert probes[-1] == PROBING.max_probe and state["r1"].throttle == "probing"
    probed = d.replicas["r1"]
    assert probed.target_step_ms == pytest.approx(45.0 * PROBING.max_probe)  # 50 ms x (1 - 0.1) x probe
    assert first.state.probe_tpot == 1.0 + CFG.probe_step
    assert probed.budget.max_offline_seqs[1] >= first.budget.max_offline_seqs[1]
    # No fresh observation (no chat in the window): the probe holds.
    held = decide(snap(t + 10, num_online=0), state, model, PROBING).replicas["r1"]
    assert held.state.probe_tpot == PROBING.max_probe
    # Near the SLO: cut at once, probe halved.
    hot = decide(snap(t + 11, num_online=3, observed_tpot_p99_ms=52.0), state, model, PROBING).replicas["r1"]
    assert hot.state.throttle == "throttled" and hot.state.scale == 0.5
    assert hot.state.probe_tpot == PROBING.max_probe * CFG.shrink_factor


def test_probing_is_off_by_default():
    d = decide(snap(100.0, num_online=1, observed_tpot_p99_ms=10.0), {}, LinearModel()).replicas["r1"]
    assert d.state.probe_tpot == 1.0 and d.state.throttle != "probing"


def test_in_the_band_a_steady_load_holds_its_budget():
    """Between probe_below and shrink_at nothing moves: a steady load does not oscillate."""
    model = LinearModel()
    state, budgets = {}, []
    for i in range(60):
        d = decide(snap(float(i), num_online=2, observed_tpot_p99_ms=40.0), state, model).replicas["r1"]
        state = {"r1": d.state}
        budgets.append(d.budget.max_offline_seqs[2])
    assert len(set(budgets)) == 1


def test_headroom_is_derived_from_the_gap_between_steps_and_observed_tpot():
    """No hand-tuned headroom: with TPOT p99 5 ms above the median chat step, a per-step target of
    the SLO less those 5 ms keeps the p99 at the SLO (an additive gap: a chat prefill costs the
    same beside any decode batch); smoothed by time; the SLO file's value overrides it."""
    import math

    from orchestrator.control.policy import derived_headroom

    load = ReplicaLoad("r1", num_online=2, observed_tpot_p99_ms=25.0, step_p50_ms=20.0)
    assert derived_headroom(None, load, 30.0, CFG) == pytest.approx(5.0 / 30.0)
    w = 1.0 - math.exp(-1.0 / CFG.headroom_smoothing_s)
    assert derived_headroom(0.4, load, 30.0, CFG, dt_s=1.0) == pytest.approx((1 - w) * 0.4 + w * 5.0 / 30.0)
    # One second moves it little, whatever the tick period; an hour forgets the old value.
    assert derived_headroom(0.4, load, 30.0, CFG, dt_s=3600.0) == pytest.approx(5.0 / 30.0)
    assert derived_headroom(0.3, ReplicaLoad("r1"), 30.0, CFG) == 0.3
    # TPOT at 25/30 of its SLO: in the band, so no probe; the target is 30 ms - 5 ms.
    free = Snapshot(now_s=0.0, slo=SloTargets(400.0, 30.0, headroom=None), replicas=(load,))
    d = decide(free, {}, LinearModel()).replicas["r1"]
    assert d.headroom == pytest.approx(5.0 / 30.0) and d.target_step_ms == pytest.approx(25.0)
    assert d.state.headroom_at_s == 0.0
    fixed = decide(snap(0.0, num_online=2, observed_tpot_p99_ms=25.0, step_p50_ms=20.0), {}, LinearModel())
    assert fixed.replicas["r1"].headroom == 0.1  # SLO's override


def _leading(flags) -> int:
    n = 0
    for f in flags:
        if not f:
            break
        n += 1
    return n


def _reference_tables(p50, p99, target, idle, factor, cfg, tail):
    """The budget tables as the policy defines them, one replica and one row at a time."""
    seqs, chunks = list(cfg.seq_candidates), list(cfg.chunk_candidates)
    shape = (cfg.table_size, len(seqs), len(chunks))
    min_chunk = int(np.searchsorted(chunks, cfg.min_offline_chunk_tokens))
    out_seqs, out_tokens = [], []
    for r in range(p50.shape[0]):
        g50, g99 = p50[r].reshape(shape), p99[r].reshape(shape)
        row_seqs, row_tokens = [], []
        for k in range(cfg.table_size):
            held = g99 if (k == 0 or tail) else g50
            limit = (max(target[r], idle[r]) if k == 0 else target[r]) / factor[r]
            fit = held[k] <= limit
            decode = _leading(fit[:, 0])
            with_chunk = min(decode, _leading(fit[:, :min_chunk + 1].all(axis=1))) if min_chunk < len(chunks) else 0
            s_chunk = seqs[with_chunk - 1] if with_chunk else 0
            s_decode = seqs[decode - 1] if decode else 0
            keep = s_chunk >= 1 and (k == 0 or s_chunk >= cfg.chunk_min_seq_share * s_decode)
            best, num = (with_chunk - 1, s_chunk) if keep else (decode - 1, s_decode)
            num_chunks = _leading(fit[max(best, 0)])
            row_seqs.append(num)
            row_tokens.append(num + chunks[max(num_chunks - 1, 0)] if best >= 0 else 0.0)
        out_seqs.append(np.minimum.accumulate(row_seqs))
        out_tokens.append(np.minimum.accumulate(row_tokens))
    return np.array(out_seqs, dtype=float), np.array(out_tokens, dtype=float)


@pytest.mark.parametrize("tail", [False, True])
def test_the_batched_tables_equal_the_rule_applied_row_by_row_on_noisy_grids(tail):
    # Running maxima stand for "the leading run of candidates under the target": checked against
    # the plain definition on non-monotone predictions (noisy leaves) at random targets.
    from latency_model.features import featurize
    from orchestrator.control.policy import _grids_at, tables_from_predictions

    rng = np.random.default_rng(3)
    num = 12
    cols = _grids_at(rng.uniform(50, 4000, num), rng.uniform(50, 4000, num), CFG)
    p50, p99 = LinearModel().predict_ms(featurize(cols))
    p50 = (p50 * rng.uniform(0.7, 1.3, p50.shape)).reshape(num, -1).astype(np.float32)
    p99 = np.maximum(p99.reshape(num, -1) * rng.uniform(0.8, 1.5, (num, p50.shape[1])), p50).astype(np.float32)
    target, idle = rng.uniform(15, 200, num), rng.uniform(10, 400, num)
    factor = rng.uniform(0.5, 2.0, num)
    got = tables_from_predictions(p50, p99, target, idle, factor, CFG, tail)
    want = _reference_tables(p50, p99, target, idle, factor, CFG, tail)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert want[0].max() > 0 and (want[0] < max(CFG.seq_candidates)).any()  # the targets bind somewhere


def test_the_grid_cache_changes_no_decision_and_asks_the_model_only_about_new_buckets():
    from orchestrator.control.policy import GridCache

    class Counting(LinearModel):
        rows = 0

        def predict_ms(self, x):
            Counting.rows += len(x)
            return super().predict_ms(x)

    rng = np.random.default_rng(5)
    model, cache = Counting(), GridCache()
    cfg = PolicyConfig(calibration_every_s=0.0)  # every replica's steps every tick, through one memo
    cached_state, fresh_state = {}, {}
    grid = CFG.table_size * len(CFG.seq_candidates) * len(CFG.chunk_candidates)
    for tick in range(6):
        loads = tuple(ReplicaLoad(f"r{i}", num_online=int(rng.integers(0, 6)), online_context_tokens=float(rng.uniform(100, 3000)),
                                  num_offline_running=int(rng.integers(0, 9)), offline_context_tokens=float(rng.uniform(100, 9000)),
                                  observed_tpot_p99_ms=30.0, step_p50_ms=20.0,
                                  recent_steps={c: rng.uniform(1, 50, 40).round() for c in
                                                ("num_prefill_tokens", "num_prefill_reqs", "prefill_context_tokens",
                                                 "prefill_attention_tokens2", "num_decode_reqs", "decode_context_tokens",
                                                 "max_decode_context_tokens", "step_latency_ms")},
                                  max_num_seqs=64) for i in range(8))
        s = Snapshot(now_s=tick * 0.25, slo=SLO, replicas=loads)
        before = Counting.rows
        with_cache = decide(s, cached_state, model, cfg, cache)
        asked = Counting.rows - before
        fresh = decide(s, fresh_state, model, cfg)
        assert with_cache == fresh
        cached_state, fresh_state = with_cache.state, fresh.state
    assert asked > 0
    # The same snapshot again: every grid, step and current batch is cached.
    before = Counting.rows
    assert decide(s, cached_state, model, cfg, cache) == fresh
    assert Counting.rows == before
    # One replica's chat grows to a context never seen: one new grid and its current batch.
    from dataclasses import replace

    moved = replace(s.replicas[0], online_context_tokens=s.replicas[0].num_online * 50_000.0 + 50_000.0,
                    num_online=s.replicas[0].num_online or 1)
    s2 = Snapshot(now_s=s.now_s + 0.25, slo=SLO, replicas=(moved, *s.replicas[1:]))
    before = Counting.rows
    with_cache = decide(s2, cached_state, model, cfg, cache)
    assert Counting.rows - before == grid + 1
    assert with_cache == decide(s2, fresh_state, model, cfg)


def test_policy_states_as_columns_round_trip_and_unchanged_replicas_keep_their_state_object():
    from orchestrator.control.policy import States, _distinct_budgets

    prev = [ReplicaState(), ReplicaState(scale=0.5, throttle="throttled", last_change_s=3.0, calm_since_s=None,
                                         headroom=0.25, headroom_at_s=2.0, cut_pressure=1.2),
            ReplicaState(throttle="probing", calm_since_s=1.5, probe_tpot=1.3)]
    cols = States.of(prev)
    assert np.isnan(cols.calm_since_s[0]) and cols.calm_since_s[2] == 1.5 and np.isnan(cols.headroom[0])
    same = cols.replica_states(prev, cols)
    assert all(a is b for a, b in zip(same, prev))
    moved = cols._replace(scale=np.array([1.0, 0.75, 1.0]), throttle=np.array([0.0, 2.0, 3.0]))
    out = moved.replica_states(prev, cols)
    assert out[0] is prev[0] and out[2] is prev[2]
    assert out[1] == ReplicaState(scale=0.75, throttle="recovering", last_change_s=3.0, headroom=0.25,
                                  headroom_at_s=2.0, cut_pressure=1.2)
    assert isinstance(out[1].scale, float) and out[1].calm_since_s is None
    assert ReplicaState.from_json(out[1].to_json()) == out[1]
    # Like tables share one budget object; each replica points at its own table.
    seqs = np.array([[4.0, 2.0], [4.0, 1.0], [4.0, 2.0]])
    tokens = np.array([[64.0, 8.0], [64.0, 8.0], [64.0, 8.0]])
    budgets, which = _distinct_budgets(seqs, tokens)
    assert len(budgets) == 2 and which == [0, 1, 0]
    assert budgets[1].max_offline_seqs == (4, 1) and budgets[0].max_offline_tokens == (64, 8)
