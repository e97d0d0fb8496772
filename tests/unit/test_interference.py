"""The interference profiler's search, profile file and plot (no engine)."""

from __future__ import annotations

import json

import pytest

from orchestrator.control.profile import load_interference_profile
from profiler.interference import (
    LoadPoint,
    plot_profile,
    profile_document,
    search_largest,
)


def point(s: int) -> LoadPoint:
    # TPOT grows with offline load: 20 ms + 3 ms per offline sequence; step p99 tracks it.
    return LoadPoint(s, ttft_p99_ms=100.0 + 10 * s, tpot_p99_ms=20.0 + 3 * s, step_p99_ms=18.0 + 3 * s,
                     offline_tokens_per_s=40.0 * s, num_online=30, num_online_failed=0)


def test_search_finds_the_largest_load_meeting_the_slo_with_few_measurements():
    measured = []

    def measure(s):
        measured.append(s)
        return point(s)

    best, points = search_largest(measure, lambda p: p.meets(400.0, 50.0), max_seqs=32)
    assert best.offline_seqs == 10  # 20 + 3 * 10 = 50 <= 50; 11 would be 53
    assert len(measured) == len(set(measured)) <= 10
    assert [p.offline_seqs for p in points] == sorted(measured)


def test_search_reports_when_even_no_offline_work_breaks_the_slo():
    best, points = search_largest(point, lambda p: p.meets(400.0, 10.0), max_seqs=8)
    assert best is None and [p.offline_seqs for p in points] == [0]


def test_search_stops_at_the_maximum_when_everything_fits():
    best, _ = search_largest(point, lambda p: True, max_seqs=12)
    assert best.offline_seqs == 12


def test_failed_online_requests_break_the_slo():
    p = LoadPoint(1, 10.0, 10.0, 9.0, 5.0, num_online=10, num_online_failed=1)
    assert not p.meets(400.0, 50.0)


def test_profile_file_round_trips_and_bad_files_name_the_problem(tmp_path):
    best, points = search_largest(point, lambda p: p.meets(400.0, 50.0), max_seqs=32)
    doc = profile_document(best, points, model="m", slo={"ttft_p99_ms": 400.0, "tpot_p99_ms": 50.0},
                           online_load={"rate_per_s": 1.0})
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(doc))
    loaded = load_interference_profile(path)
    assert loaded["step_budget_ms"] == 48.0 and loaded["offline_seqs"] == 10
    png = plot_profile(loaded, tmp_path / "profile.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    path.write_text(json.dumps(doc)[:40])
    with pytest.raises(ValueError, match="profile.json: not valid JSON"):
        load_interference_profile(path)
    path.write_text(json.dumps({**doc, "step_budget_ms": -3}))
    with pytest.raises(ValueError, match="step_budget_ms must be a positive number"):
        load_interference_profile(path)
    path.write_text(json.dumps({"kind": "other"}))
    with pytest.raises(ValueError, match="not a ColocateInterferenceProfile"):
        load_interference_profile(path)
