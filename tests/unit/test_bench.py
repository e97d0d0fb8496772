"""The benchmark's arithmetic and reports on hand-made runs (no stack)."""

from __future__ import annotations

import pytest

from bench.bench import attainment, counter_delta, format_table, plot, summarize, wilson_interval

SLO = {"ttft_p99_ms": 300.0, "tpot_p99_ms": 100.0, "source": "test"}


def run(name, offline_tps, online_tps, reqs, reactions=()):
    return {"policy": name, "offline_tokens_per_s": offline_tps, "offline_prompt_tokens_per_s": 3 * offline_tps,
            "online_tokens_per_s": online_tps,
            "total_tokens_per_s": offline_tps + online_tps, "engine_busy_fraction": 0.5, "offline_preempted": 0,
            "ttft_p50_ms": 100.0, "ttft_p99_ms": 200.0, "tpot_p50_ms": 50.0, "tpot_p99_ms": 90.0,
            "requests": reqs, "ttft_ms": [r[0] for r in reqs], "tpot_ms": [r[1] for r in reqs],
            "throttle_reaction_ms": list(reactions),
            "timeseries": [{"t": t, "online_requests": t % 3, "num_offline_tokens_total": 10.0 * t,
                            "offline_budget_seqs": 4} for t in range(10)]}


def test_attainment_counts_requests_meeting_both_targets():
    row = {"requests": [(100.0, 50.0, True), (400.0, 50.0, True), (100.0, 150.0, True), (100.0, None, True),
                        (None, None, False)]}
    assert attainment(row, SLO) == 2 / 5


def test_counter_delta_sums_replicas_within_the_window():
    samples = [{"replica_id": r, "t": t, "c": base + 10 * t} for r, base in (("a", 0), ("b", 100)) for t in range(6)]
    assert counter_delta(samples, "c", 1, 4) == 2 * 30


def test_summary_ratios_and_checks():
    good = [(100.0, 50.0, True)] * 100
    bad = [(900.0, 300.0, True)] * 50 + good[:50]
    runs = {"online-only": [run("online-only", 0, 20, good)], "offline-only": [run("offline-only", 200, 0, [])],
            "naive": [run("naive", 150, 20, bad)], "static-2": [run("static-2", 40, 20, good)],
            "colocate": [run("colocate", 100, 20, good, reactions=(30.0, 50.0))]}
    for rows in runs.values():
        for r in rows:
            r["slo_attainment"] = attainment(r, SLO)
    sweep = [{"batch": 1, "tpot_p99_ms": 40.0, "offline_tokens_per_s": 60.0},
             {"batch": 4, "tpot_p99_ms": 95.0, "offline_tokens_per_s": 130.0},
             {"batch": 16, "tpot_p99_ms": 180.0, "offline_tokens_per_s": 190.0}]
    s = summarize(runs, sweep, SLO)
    assert s["slo_bounded_batch"] == 4 and s["slo_bounded_tokens_per_s"] == 130.0
    assert s["best_static_meeting_slo"] == "static-2"
    assert s["colocate_vs_best_static_offline"] == 100 / 40
    # Offline output tokens/s as shares of the same workload's ceilings: <= 1 by construction.
    assert s["policies"]["colocate"]["slo_bounded_utilization"] == 100 / 130
    assert s["policies"]["colocate"]["utilization_vs_offline_only"] == 100 / 200
    assert s["policies"]["colocate"]["throttle_reaction_ms"]["median"] == 40.0
    assert s["checks"] == {"colocate_attainment_ge_0.99": True, "naive_attainment_lt_0.99": True,
                           "colocate_ge_1.5x_best_static": True, "colocate_wilson_lower_ge_0.97": False,
                           "colocate_ge_1.0x_best_static": True, "no_dry_backlog": True,
                           # 100 against static-2's 40 and offline-only's 200
                           "colocate_ge_2x_best_static": True, "colocate_ge_0.8_offline_only": False}
    assert s["policies"]["naive"]["slo_attainment_ci95"] == list(wilson_interval(50, 100))
    assert "offline-only" not in {n for n, m in s["policies"].items() if "slo_attainment_ci95" in m}
    table = format_table(s)
    assert "colocate" in table and "SLO-bounded batch 4" in table
    assert "attainment 95% interval (Wilson, 100 requests): online-only 0.963-1.000" in table
    assert "over" not in table  # one run per policy: no spread lines
    assert "output (decode) tokens" in table and "ran dry" not in table


def test_a_run_whose_backlog_ran_dry_is_flagged():
    from bench.bench import backlog_dry_s

    held = [{"replica_id": "r", "t": float(t), "offline_running": 0 if 4 <= t < 9 else 3, "offline_waiting": 0}
            for t in range(12)]
    assert backlog_dry_s(held, 0.0, 11.0) == 5.0
    assert backlog_dry_s(held, 0.0, 3.0) == 0.0


def test_attainment_interval_is_wilsons():
    # Reference values of the 95% Wilson score interval.
    assert wilson_interval(99, 100) == pytest.approx((0.9455, 0.9982), abs=1e-4)
    assert wilson_interval(100, 100) == pytest.approx((0.9630, 1.0), abs=1e-4)
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_repeated_policies_show_their_spread():
    good = [(100.0, 50.0, True)] * 10
    runs = {"online-only": [run("online-only", 0, 20, good)], "offline-only": [run("offline-only", 200, 0, [])],
            "colocate": [run("colocate", tps, 20, good) for tps in (90, 130, 100)]}
    for rows in runs.values():
        for r in rows:
            r["slo_attainment"] = attainment(r, SLO)
    s = summarize(runs, [], SLO)
    assert s["policies"]["colocate"]["offline_tokens_per_s"] == {"median": 100, "min": 90, "max": 130}
    assert "colocate over 3 runs (min-max): attain 1.000-1.000, off tok/s 90-130" in format_table(s)


def test_plots_are_written(tmp_path):
    reqs = [(100.0 + i, 50.0 + i, True) for i in range(20)]
    runs = {n: [run(n, 10, 10, reqs)] for n in ("online-only", "naive", "static-2", "colocate")}
    paths = plot(runs, {"slo": SLO}, tmp_path)
    assert [p.name for p in paths] == ["latency_cdf.png", "timeseries.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_length_limits_scale_to_a_small_context_or_keep_the_recorded_lengths():
    from bench.bench import length_limits

    # The bench model (2,048 context): chat scaled by a quarter, offline (arXiv) by an eighth.
    assert length_limits(2048, False, "chat") == {"length_scale": 0.25, "max_prompt_tokens": 512, "max_output_tokens": 256}
    assert length_limits(2048, False, "offline") == {"length_scale": 0.125, "max_prompt_tokens": 1024,
                                                      "max_output_tokens": 256}
    # Full lengths, either kind: as recorded, the prompt within three quarters of the context.
    for kind in ("chat", "offline"):
        assert length_limits(4096, True, kind) == {"length_scale": 1.0, "max_prompt_tokens": 3072,
                                                   "max_output_tokens": 1024}
