"""The convergence report's arithmetic."""

from __future__ import annotations

from bench.converge import convergence


def test_convergence_is_the_first_time_after_which_the_budget_stays_within_20_percent():
    times = list(range(200))
    values = [2.0] * 30 + [30.0, 8.0] + [20.0] * 168  # a probe overshoot at 30 s, then steady 20
    r = convergence(times, values, steady_s=60)
    assert r["steady"] == 20.0 and r["converged_at_s"] == 32.0
    assert r["steady_min"] == r["steady_max"] == 20.0 and r["steady_cv"] == 0.0
    # Small budgets: one sequence is the resolution.
    assert convergence(times, [1.0, 2.0] * 100, steady_s=60)["converged_at_s"] == 0.0
