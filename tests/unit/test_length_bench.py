"""The length-scheduling bench's pure parts: the workload, the injected predictions, the summary."""

from __future__ import annotations

import numpy as np
import pytest

from bench.length_sched import (
    LengthBenchOptions,
    PolicyResult,
    build_workload,
    predictions_for,
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
