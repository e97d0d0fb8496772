"""The demo's arithmetic and reports on hand-made recordings (no Ray, no vLLM)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import yaml

from bench.demo import (
    ProgressState,
    ResultTail,
    build_summary,
    chat_rows,
    chat_stats,
    counter_rate,
    format_summary,
    meets_slo,
    offline_output,
    plot_timeseries,
    progress_line,
    rate_series,
    reference_slo,
    result_row,
    slo_file_text,
    throttle_stats,
)
from orchestrator.stats import wilson_interval

SLO = {"ttft_p99_ms": 300.0, "tpot_p99_ms": 100.0}


@dataclass
class Result:  # the fields of profiler.workload.ChatResult the demo reads
    arrival_s: float
    ttft_s: float | None
    tpot_s: float | None
    ok: bool = True


def row(ttft, tpot, ok=True, phase="colocated", t=0.0):
    return {"phase": phase, "t": t, "ttft_ms": ttft, "tpot_ms": tpot, "ok": ok}


def test_chat_rows_convert_to_ms_on_the_demo_timeline():
    rows = chat_rows([Result(1.0, 0.2, 0.05), Result(2.5, None, None, ok=False)], "alone", 10.0)
    assert rows[0] == {"phase": "alone", "t": 11.0, "ttft_ms": 200.0, "tpot_ms": 50.0, "ok": True}
    assert rows[1]["t"] == 12.5 and rows[1]["ttft_ms"] is None and not rows[1]["ok"]


def test_a_request_meets_the_slo_only_on_both_targets():
    assert meets_slo(row(300.0, 100.0), SLO)  # at the target is within it
    assert not meets_slo(row(301.0, 50.0), SLO)
    assert not meets_slo(row(100.0, 101.0), SLO)
    assert meets_slo(row(100.0, None), SLO)  # a one-token reply has no TPOT
    assert not meets_slo(row(None, None), SLO)
    assert not meets_slo(row(100.0, 50.0, ok=False), SLO)


def test_attainment_counts_every_request_with_its_wilson_interval():
    rows = [row(100.0, 50.0)] * 18 + [row(400.0, 50.0), row(None, None, ok=False)]
    s = chat_stats(rows, SLO)
    assert s["num_requests"] == 20 and s["num_ok"] == 19 and s["num_met"] == 18
    assert s["attainment"] == 0.9
    assert s["attainment_ci95"] == list(wilson_interval(18, 20))
    assert s["ttft_p50_ms"] == 100.0
    assert s["ttft_p99_ms"] == pytest.approx(100.0 + 0.99 * 18 * 300.0 - 17 * 300.0)  # numpy's linear p99
    assert chat_stats([], SLO)["attainment"] is None


def test_reference_slo_is_the_factor_times_the_alone_p99():
    ref = chat_stats([row(100.0, 20.0), row(200.0, 40.0)])
    slo = reference_slo(ref, factor=1.5)
    assert slo == {"ttft_p99_ms": round(1.5 * ref["ttft_p99_ms"], 1), "tpot_p99_ms": round(1.5 * ref["tpot_p99_ms"], 1)}
    with pytest.raises(RuntimeError, match="no latencies"):
        reference_slo(chat_stats([row(None, None, ok=False)]))


def test_slo_file_copy_changes_only_the_targets():
    text = ("kind: ColocateSLO\nversion: 1\nmodels:\n  colocate-tiny:\n    ttft_p99_ms: 1000.0\n"
            "    tpot_p99_ms: 60.0\n    headroom: 0.1\n  other:\n    ttft_p99_ms: 5.0\n    tpot_p99_ms: 6.0\n")
    doc = yaml.safe_load(slo_file_text(text, "colocate-tiny", {"ttft_p99_ms": 123.4, "tpot_p99_ms": 45.6}))
    assert doc["models"]["colocate-tiny"] == {"ttft_p99_ms": 123.4, "tpot_p99_ms": 45.6, "headroom": 0.1}
    assert doc["models"]["other"] == {"ttft_p99_ms": 5.0, "tpot_p99_ms": 6.0}
    assert doc["kind"] == "ColocateSLO"


def samples_of(states, replica="a", start=0.0, tokens_per_s=10.0, budgets=None, reactions=()):
    return [{"t": start + i, "round": i, "replica_id": replica, "throttle": st, "throttle_scale": 0.5 if st == "throttled" else 1.0,
             "offline_budget_seqs": (budgets or [4] * len(states))[i], "num_offline_tokens_total": tokens_per_s * i,
             "online_requests": 1, "throttle_reactions": list(reactions)}
            for i, st in enumerate(states)]


def test_throttle_episodes_are_transitions_into_throttled_within_the_window():
    states = ["open", "throttled", "throttled", "recovering", "open", "throttled", "open", "throttled"]
    samples = samples_of(states) + samples_of(["throttled", "open"], replica="b")
    s = throttle_stats(samples, t0=0.0, t1=6.0, wall0=0.0, wall1=0.0)
    # replica a: two entries within t <= 6 (the one at t=7 is outside); b opens throttled: one
    assert s["episodes"] == 3
    assert s["throttled_share"] == pytest.approx(4 / 9)
    assert s["min_scale"] == 0.5
    assert s["budget_seqs_min"] == 4 and s["num_reactions"] == 0 and s["reaction_ms_median"] is None


def test_throttle_reactions_are_deduplicated_and_windowed_on_the_wall_clock():
    # Every report repeats the replica's recent reactions: each counts once.
    samples = samples_of(["open"] * 3, reactions=[(100.0, 20.0), (105.0, 40.0), (300.0, 999.0)])
    s = throttle_stats(samples, 0.0, 10.0, wall0=99.0, wall1=200.0)
    assert s["num_reactions"] == 2 and s["reaction_ms_median"] == 30.0 and s["reaction_ms_max"] == 40.0


def test_counter_rate_and_rate_series_sum_replicas():
    samples = samples_of(["open"] * 5) + samples_of(["open"] * 5, replica="b", tokens_per_s=30.0)
    assert counter_rate(samples, "num_offline_tokens_total", 1.0, 4.0) == 40.0
    times, rates = rate_series(samples, "num_offline_tokens_total")
    assert times == [1, 2, 3, 4] and rates == [40.0] * 4
    assert counter_rate(samples, "num_offline_tokens_total", 2.0, 2.0) is None


def record(cid, tokens, status=200):
    body = {"usage": {"completion_tokens": tokens}} if status == 200 else {"error": {"message": "x"}}
    return {"id": cid, "custom_id": cid, "response": {"status_code": status, "body": body}, "error": None}


def test_offline_output_counts_decode_tokens_of_results_within_the_window():
    results = [result_row(record("a", 10), 1.0), result_row(record("b", 20), 5.0),
               result_row(record("c", 30, status=400), 6.0), result_row(record("d", 40), 20.0)]
    assert not results[2]["ok"] and results[2]["completion_tokens"] == 0
    out = offline_output(results, 2.0, 12.0)
    assert out == {"num_results": 2, "num_ok": 1, "completion_tokens": 20, "tokens_per_s": 2.0}


def test_result_tail_reads_complete_lines_only(tmp_path):
    path = tmp_path / "out.jsonl"
    tail = ResultTail(path)
    assert tail.poll(0.0) == 0  # not there yet
    path.write_text(json.dumps(record("a", 5)) + "\n" + json.dumps(record("b", 7))[:10])
    assert tail.poll(1.0) == 1
    with open(path, "a") as f:
        f.write(json.dumps(record("b", 7))[10:] + "\n")
    assert tail.poll(2.0) == 1
    assert [(r["custom_id"], r["t"], r["completion_tokens"]) for r in tail.rows] == [("a", 1.0, 5), ("b", 2.0, 7)]


def make_summary():
    rows = ([row(100.0, 20.0, phase="alone", t=t) for t in range(5)]
            + [row(150.0, 30.0, t=20 + t) for t in range(9)] + [row(500.0, 30.0, t=29)])
    samples = samples_of(["open", "open", "throttled", "open"] * 10, budgets=[4, 2, 1, 3] * 10,
                         reactions=[(1000.0 + 21, 15.0)])
    for x in samples:  # offline tokens flow from t = 20 (the co-located window); chat tokens throughout
        x.update(num_offline_tokens_total=max(0.0, 10.0 * (x["t"] - 20)), num_online_tokens_total=3.0 * x["t"])
    results = [result_row(record(f"r{i}", 16), 20.0 + i) for i in range(12)]
    reference = chat_stats([r for r in rows if r["phase"] == "alone"])
    return build_summary(
        slo={"ttft_p99_ms": 150.0, "tpot_p99_ms": 30.0}, reference=reference, rows=rows, samples=samples,
        results=results, alone={"t0": 0.0, "t1": 5.0, "wall0": 1000.0, "wall1": 1005.0},
        window={"t0": 20.0, "t1": 30.0, "wall0": 1000.0 + 20, "wall1": 1000.0 + 30},
        batch={"job_id": "j", "status": "SUCCEEDED", "finished": True, "num_requests": 12, "output": "o"},
        model={"num_steps": 1200, "sweep_s": 20.0, "median_mape": 0.5, "timing_noise_floor": 0.2},
        timings={"stack start": 100.0}), rows, samples


def test_summary_and_its_text():
    s, _, _ = make_summary()
    assert s["chat"]["num_requests"] == 10 and s["chat"]["num_met"] == 9 and s["chat"]["attainment"] == 0.9
    assert s["offline"]["completion_tokens"] == 11 * 16  # results at t = 20..30 (the 12th is at 31)
    assert s["offline"]["tokens_per_s"] == pytest.approx(11 * 16 / 10)
    assert s["offline"]["batch_finished_at_s"] == 11.0
    assert s["batch"]["num_results"] == 12 and s["batch"]["completion_tokens"] == 12 * 16
    assert s["throttle"]["episodes"] == 3  # throttled at t = 22, 26, 30
    assert s["throttle"]["num_reactions"] == 1
    text = format_summary(s)
    assert "TTFT p99 <= 150 ms, TPOT p99 <= 30 ms" in text
    assert "90.0% met the SLO (9/10; 95% interval" in text
    assert "17.6 output tokens/s" in text
    assert "3 controller throttle episodes" in text and "1 chat bursts cut offline work within 15 ms" in text
    assert "12/12 results" in text
    assert s["warnings"] == [] and "warning" not in text
    json.dumps(s)  # summary.json


def test_summary_warns_when_the_reference_was_not_chat_alone_or_the_engine_went_unseen():
    s, rows, samples = make_summary()
    # Offline tokens admitted while chat ran alone (t <= 5), and the chat counter flat throughout.
    flat = [{**x, "num_online_tokens_total": 5.0,
             "num_offline_tokens_total": 10.0 * min(x["t"], 5)} for x in samples]
    results = [result_row(record("early", 16), 2.0)]
    s = build_summary(slo=s["slo"], reference=s["reference"], rows=rows, samples=flat, results=results,
                      alone={"t0": 0.0, "t1": 5.0, "wall0": 0.0, "wall1": 5.0},
                      window={"t0": 20.0, "t1": 30.0, "wall0": 20.0, "wall1": 30.0},
                      batch={"job_id": "j", "status": "STOPPED", "finished": False, "num_requests": 1, "output": "o"},
                      model={}, timings={})
    assert len(s["warnings"]) == 2
    assert "offline work ran while chat was measured alone (10 offline tokens/s admitted)" in s["warnings"][0]
    assert "saw no chat tokens" in s["warnings"][1]
    assert "  warning         offline work ran" in format_summary(s)


def test_progress_line_fits_the_terminal():
    p = ProgressState(phase="chat + batch job, co-located", started_s=0.0, chat_done=3, chat_total=45,
                      batch_done=10, batch_total=60, budget_seqs=6)
    assert progress_line(p, 102.0) == ("[demo 1:42] chat + batch job, co-located | chat 3/45 | batch 10/60 | "
                                       "offline budget 6 seqs")
    assert len(progress_line(p, 102.0, width=30)) == 30
    assert progress_line(ProgressState(phase="starting", started_s=0.0), 5.0) == "[demo 0:05] starting"


def test_plot_is_written(tmp_path):
    s, rows, samples = make_summary()
    path = plot_timeseries(rows, samples, s["slo"], {"t0": 0.0, "t1": 5.0}, {"t0": 20.0, "t1": 30.0},
                           tmp_path / "timeseries.png")
    assert path.stat().st_size > 10_000
