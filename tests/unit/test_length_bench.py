"""The length-scheduling bench's pure parts: the workload, the injected predictions, the summary."""

from __future__ import annotations

import numpy as np
import pytest

from bench.length_sched import (
    LengthBenchOptions,
    PolicyResult,
    build_workload,
    format_rounds,
    pooled,
    predictions_for,
    round_schedule,
    round_slices,
    summarize,
    with_ratios,
)
from latency_model.length.metrics import kendall_tau


def _workload(n=300, seed=0):
    rng = np.random.default_rng(5)
    prompts = [f"prompt {i}" for i in range(500)]
    tokens = rng.lognormal(6, 1, size=500).astype(int) + 1
    return build_workload(prompts, tokens, rate_per_s=2.0, opts=LengthBenchOptions(num_requests=n, seed=seed))


def test_workload_is_seeded_bursty_and_scaled_in_order():
    a, b = _workload(), _workload()
    assert [r.prompt for r in a] == [r.prompt for r in b]
    arrivals = np.array([r.arrival_s for r in a])
    gaps = np.diff(arrivals)
    assert np.all(gaps >= 0) and gaps.std() / gaps.mean() > 1.4  # CV about 2
    assert abs(np.median([r.max_tokens for r in a]) - 24) <= 4
    assert max(r.max_tokens for r in a) <= 256 and min(r.max_tokens for r in a) >= 1
    # Scaling keeps the order of the lengths (up to the cap and rounding).
    assert kendall_tau([r.true_tokens for r in a], [r.max_tokens for r in a]) > 0.95
    assert [r.prompt for r in _workload(seed=1)] != [r.prompt for r in a]


@pytest.mark.parametrize(("policy", "low", "high"), [("oracle", 0.99, 1.0), ("tau0.3", 0.24, 0.36),
                                                     ("tau0", -0.08, 0.08), ("adversarial", -1.0, -0.95)])
def test_injected_predictions_have_the_named_quality(policy, low, high):
    w = _workload()
    table = predictions_for(policy, w, seed=0)
    tau = kendall_tau([table[r.prompt] for r in w], [r.max_tokens for r in w])
    assert low <= tau <= high
    assert predictions_for("fcfs", w, seed=0) is None


def test_summary_and_ratios_against_fcfs():
    fcfs = PolicyResult("fcfs", e2e_ms=[100.0] * 10, ttft_ms=[10.0] * 9 + [1000.0], offline_tokens=50, duration_s=10)
    sjf = PolicyResult("sjf", e2e_ms=[60.0] * 10, ttft_ms=[10.0] * 10, offline_tokens=50, duration_s=10)
    rows = with_ratios([summarize(fcfs, ttft_target_ms=20), summarize(sjf, ttft_target_ms=20)])
    assert rows[0]["attainment"] == 0.9 and rows[1]["attainment"] == 1.0
    assert rows[1]["attainment_wilson_low"] < 1.0
    assert rows[1]["e2e_mean_vs_fcfs"] == pytest.approx(0.6)
    assert rows[1]["offline_vs_fcfs"] == pytest.approx(1.0)


def test_rounds_slice_the_workload_and_alternate_the_order():
    w = _workload(n=10)
    slices = round_slices(w, 3)
    assert [len(x) for x in slices] == [4, 3, 3]
    assert [r.prompt for x in slices for r in x] == [r.prompt for r in w]  # every request once, in order
    assert all(x[0].arrival_s == 0.0 for x in slices)
    assert slices[1][1].arrival_s == pytest.approx(w[5].arrival_s - w[4].arrival_s)
    groups = [("A", ["fcfs", "sjf"]), ("B", ["srpt"]), ("C", [])]
    plan = round_schedule(groups, 3)
    assert plan == [(0, "A", ["fcfs", "sjf"]), (0, "B", ["srpt"]),
                    (1, "B", ["srpt"]), (1, "A", ["sjf", "fcfs"]),
                    (2, "A", ["fcfs", "sjf"]), (2, "B", ["srpt"])]
    # Under a linear drift (each run later is slower) each ABBA pair of rounds gives every policy
    # the same mean position.
    position = {}
    runs = [pol for _, _, policies in plan for pol in policies]
    for t, pol in enumerate(runs):
        position.setdefault(pol, []).append(t)
    assert np.mean(position["fcfs"][:2]) == np.mean(position["sjf"][:2])


def test_pooled_results_sum_over_rounds_and_keep_the_last_trust():
    a = PolicyResult("sjf", e2e_ms=[1.0, 2.0], ttft_ms=[1.0, 1.0], offline_tokens=10, duration_s=5.0,
                     num_chat_preempted=1, live_tau=0.1, trust=0.5)
    b = PolicyResult("sjf", e2e_ms=[3.0], ttft_ms=[2.0], offline_tokens=5, duration_s=5.0,
                     num_chat_preempted=2, live_tau=0.3, trust=1.0)
    p = pooled([a, b])
    assert p.e2e_ms == [1.0, 2.0, 3.0] and p.offline_tokens == 15 and p.duration_s == 10.0
    assert p.num_chat_preempted == 3 and (p.live_tau, p.trust) == (0.3, 1.0)
    assert a.e2e_ms == [1.0, 2.0]  # the parts are not changed
    table = format_rounds([{"round": 1, "policy": "fcfs", "e2e_mean_ms": 100.0},
                           {"round": 2, "policy": "fcfs", "e2e_mean_ms": 120.0}])
    assert "round 2" in table and "120" in table
