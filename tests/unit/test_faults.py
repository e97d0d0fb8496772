"""The fault report's arithmetic (bench.faults), on records made by hand."""

from __future__ import annotations

import json

from bench.faults import ChatRecord, fault_report, job_count

SLO = {"ttft_p99_ms": 100.0, "tpot_p99_ms": 20.0}


def ok(start, ttft_ms=50.0, tokens=5, tpot_ms=10.0):
    first = start + ttft_ms / 1000
    return ChatRecord(start, first + (tokens - 1) * tpot_ms / 1000, first, tokens, "ok")


def test_fault_report_counts_what_was_in_flight_and_when_chat_recovered():
    records = [
        ok(0.0),                                                  # done before the fault
        ok(9.95, ttft_ms=30.0),                                   # in flight at 10 s, completed
        ChatRecord(9.9, 10.4, None, 0, "clean_error", "503: replica died"),
        ChatRecord(9.8, 70.0, None, 0, "hung", "no reply within 60 s"),
        ChatRecord(10.5, 10.6, None, 0, "error", "RemoteProtocolError: cut"),
        ok(11.0, ttft_ms=900.0),                                  # served late: 11.9 s
        *[ok(12.0 + i) for i in range(10)],                       # ten in a row meet the SLO
    ]
    r = fault_report(records, 10.0, 30.0, SLO, slo_run=10)
    assert r["in_flight"] == 3 and r["in_flight_ok"] == 1 and r["in_flight_clean_error"] == 1
    assert r["in_flight_hung"] == 1 and r["in_flight_error"] == 0
    assert abs(r["new_chat_served_after_s"] - 1.9) < 1e-9
    assert r["slo_holds_again_after_s"] == 2.0
    assert r["num_after"] == 12 and abs(r["attainment_after"] - 10 / 12) < 1e-9


def test_slo_never_recovering_and_slow_tokens_are_reported_as_such():
    slow = [ok(1.0 + i, tpot_ms=50.0) for i in range(12)]  # every one misses TPOT
    r = fault_report(slow, 0.5, 20.0, SLO, slo_run=10)
    assert r["slo_holds_again_after_s"] is None and r["attainment_after"] == 0.0
    assert fault_report([], 0.0, 1.0, SLO)["new_chat_served_after_s"] is None


def test_job_count_finds_duplicates_and_missing_results(tmp_path):
    out = tmp_path / "out.jsonl"
    lines = [{"custom_id": c, "response": {"status_code": 200}} for c in ("a", "b", "b")]
    out.write_text("".join(json.dumps(x) + "\n" for x in lines))
    c = job_count(out, ["a", "b", "c"])
    assert (c["num_results"], c["num_unique"], c["num_duplicates"], c["num_missing"]) == (3, 2, 1, 1)
    assert not c["exactly_once"] and c["status_codes"] == {"200": 3}
    out.write_text("".join(json.dumps({"custom_id": x, "response": {"status_code": 200}}) + "\n" for x in "abc"))
    assert job_count(out, ["a", "b", "c"])["exactly_once"]
    assert job_count(tmp_path / "none.jsonl", ["a"])["num_missing"] == 1


def test_engine_report_takes_the_peak_kv_the_preemptions_and_the_fullest_replica_in_the_window():
    from bench.faults import engine_report

    samples = [{"t_s": t, "replica": r, "kv_cache_usage": kv, "num_offline_preempted_total": n, "num_ongoing": q}
               for t, r, kv, n, q in [(1, "a", 0.2, 0, 40), (5, "a", 0.97, 3, 9), (6, "b", 0.5, 1, 12),
                                      (7, "b", 0.4, 4, 3), (12, "a", 0.99, 9, 50)]]
    assert engine_report(samples, 4.0, 10.0) == {"kv_cache_usage_max": 0.97, "num_offline_preempted": 3,
                                                 "num_ongoing_max": 12}
    assert engine_report([], 0.0, 1.0) == {"kv_cache_usage_max": None, "num_offline_preempted": 0,
                                           "num_ongoing_max": None}
