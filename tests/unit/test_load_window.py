"""The replica's windowed latency signal."""

from __future__ import annotations

import pytest

from orchestrator.engine.load import MIN_RUNNING_TPOT_TOKENS, OnlineLatencies, running_tpot_ms


def test_a_running_request_counts_once_its_tpot_is_a_rate_over_enough_tokens():
    # Two tokens in, one slow step (a prefill chunk beside it) is all its "TPOT" would be.
    assert running_tpot_ms(10.0, 9.8, 2) is None
    assert running_tpot_ms(10.0, None, 40) is None
    assert running_tpot_ms(10.0, 9.0, MIN_RUNNING_TPOT_TOKENS) == pytest.approx(1000.0 / (MIN_RUNNING_TPOT_TOKENS - 1))
    # A long reply's latency shows while it runs: slower than every finished request, it is the p99.
    lat = OnlineLatencies()
    lat.add({"time_s": [9.0, 9.5], "ttft_ms": [float("nan")] * 2, "tpot_ms": [40.0, 50.0]})
    assert lat.p99s(10.0, running_tpot_max_ms=running_tpot_ms(10.0, 5.0, 51))[1] == pytest.approx(99.0)  # of 40, 50, 100
    assert lat.p99s(10.0)[1] == pytest.approx(40.0 + 0.99 * 10.0)
