"""The bursty trace generator: Azure CSV format, the CV asked for, real lengths, seeded."""

from __future__ import annotations

import pytest

from bench.bursty import bursty_trace, main, measured_cv
from profiler.workload import load_chat_trace


def test_a_bursty_trace_has_the_cv_asked_for_and_reads_as_an_azure_trace(tmp_path):
    frame = bursty_trace(num_requests=4000, rate_per_s=1.0, cv=2.0, seed=1)
    assert measured_cv(frame) == pytest.approx(2.0, rel=0.15)
    assert list(frame.columns) == ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
    assert bursty_trace(num_requests=4000, rate_per_s=1.0, cv=2.0, seed=1).equals(frame)  # seeded
    assert not bursty_trace(num_requests=4000, rate_per_s=1.0, cv=2.0, seed=2).equals(frame)
    path = tmp_path / "b.csv"
    assert main(["--out", str(path), "--cv", "2", "--seed", "3", "--num-requests", "500"]) == 0
    specs = load_chat_trace(path, rate_per_s=0.8, duration_s=100, length_scale=0.1, max_prompt_tokens=256,
                            max_output_tokens=64)
    assert len(specs) == 80 and specs[-1].arrival_s == pytest.approx(100, rel=0.05)
    with pytest.raises(SystemExit):  # never overwrites
        main(["--out", str(path)])
