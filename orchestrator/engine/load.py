"""What a replica tells the controller about its engine, computed from the engine's own records.

A Serve replica (`orchestrator.serving.server`) reads step rows and per-request latency events
from its engine's channel; the simulator (`orchestrator.sim`) produces the same rows. Both hand
them to one `LoadWindow`, so the observed p99s, the step percentiles and the calibration steps the
controller decides on are computed by the same code, over the same windows.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

import numpy as np

from latency_model.features import INPUT_COLUMNS
from orchestrator.stats import p99, percentile

LATENCY_WINDOW_S = 5.0
"""Observed online TTFT/TPOT are p99s over requests of this recent window."""
CALIBRATION_COLUMNS = (*INPUT_COLUMNS, "step_latency_ms")
MAX_NEW_STEPS = 512
"""Most engine steps sent with one report (a report every 100 ms sees a few dozen at most)."""
CALIBRATION_STEPS = 48
"""Latest engine steps sent with each report, for the controller to calibrate its model on."""


MIN_RUNNING_TPOT_TOKENS = 16
"""A chat request still running counts in the TPOT p99 once it has this many output tokens.
Over its first few tokens a "TPOT" is one or two steps' latency, and the steps right after a
request's first token are the ones that carry other requests' prefill chunks: the slowest such
partial TPOT among the running requests, added to every report, put the controller's windowed
TPOT p99 over the whole run's client-side p99 in 12-16% of reports where a p99 over a handful of
finished requests should be there in about 5% (three steady-trace runs), and each such report
could cut the budget. Sixteen tokens average over as many steps; a long reply still shows its
latency long before it ends."""


def running_tpot_ms(now_s: float, first_token_s: float | None, num_output_tokens: int) -> float | None:
    """The TPOT so far of a chat request still running (None: too few tokens to be a rate)."""
    if first_token_s is None or num_output_tokens < MIN_RUNNING_TPOT_TOKENS:
        return None
    return (now_s - first_token_s) * 1000.0 / (num_output_tokens - 1)


class OnlineLatencies:
    """Recent online TTFT and TPOT per request, as the engine measured them (the channel's
    latency ring), over the last `window_s` seconds (wall clock of this host)."""

    def __init__(self, window_s: float = LATENCY_WINDOW_S) -> None:
        self.window_s = window_s
        self.ttft_ms: collections.deque[tuple[float, float]] = collections.deque()
        self.tpot_ms: collections.deque[tuple[float, float]] = collections.deque()

    def add(self, rows: Mapping[str, Any]) -> None:
        for t, ttft, tpot in zip(rows["time_s"], rows["ttft_ms"], rows["tpot_ms"]):
            if ttft == ttft:  # not NaN
                self.ttft_ms.append((float(t), float(ttft)))
            if tpot == tpot:
                self.tpot_ms.append((float(t), float(tpot)))

    def p99s(self, now_s: float, running_tpot_max_ms: float = 0.0) -> tuple[float | None, float | None]:
        """p99 TTFT and TPOT; a request still running with a slower TPOT than any finished one
        counts too (a long reply must not hide its latency until it ends)."""
        for q in (self.ttft_ms, self.tpot_ms):
            while q and q[0][0] < now_s - self.window_s:
                q.popleft()
        tpots = [v for _, v in self.tpot_ms] + ([running_tpot_max_ms] if running_tpot_max_ms > 0 else [])
        return p99(v for _, v in self.ttft_ms), p99(tpots)


class LoadWindow:
    """The windowed part of a replica's report: observed online p99s, the latency of recent steps
    that held chat, and the latest steps for calibration and live learning."""

    def __init__(self, window_s: float = LATENCY_WINDOW_S) -> None:
        self.window_s = window_s
        self.latencies = OnlineLatencies(window_s)
        # Latencies of recent steps that held online requests: (end time, ms), over window_s.
        self.online_steps: collections.deque[tuple[float, float]] = collections.deque()
        self.recent_steps: collections.deque[tuple[float, ...]] = collections.deque(maxlen=CALIBRATION_STEPS)

    def observe(self, steps: Mapping[str, np.ndarray], latency_events: Mapping[str, Any], now_s: float,
                running_tpot_max_ms: float = 0.0) -> dict[str, Any]:
        """Take the steps (columns: CALIBRATION_COLUMNS, `end_time_s`, `num_online_reqs`,
        `kv_cache_usage`) and latency events (`time_s`, `ttft_ms`, `tpot_ms`) since the last
        report; return the report's windowed fields."""
        self.latencies.add(latency_events)
        ttft_p99, tpot_p99 = self.latencies.p99s(now_s, running_tpot_max_ms)
        with_online = np.asarray(steps["num_online_reqs"]) > 0
        self.online_steps.extend(zip(np.asarray(steps["end_time_s"])[with_online],
                                     np.asarray(steps["step_latency_ms"])[with_online]))
        self.recent_steps.extend(zip(*(steps[c] for c in CALIBRATION_COLUMNS)))
        horizon = now_s - self.window_s
        while self.online_steps and self.online_steps[0][0] < horizon:
            self.online_steps.popleft()
        num_steps = len(steps["step_latency_ms"])
        return {
            "kv_cache_usage": float(steps["kv_cache_usage"][-1]) if num_steps else None,
            "num_steps": num_steps,
            "step_p99_ms": p99(ms for _, ms in self.online_steps),
            "step_p50_ms": percentile((ms for _, ms in self.online_steps), 50.0),
            # Every step since the last report, for the controller to learn this engine's speed on.
            "new_steps": {c: np.asarray(steps[c][-MAX_NEW_STEPS:]).tolist() for c in CALIBRATION_COLUMNS},
            "observed_ttft_p99_ms": ttft_p99,
            "observed_tpot_p99_ms": tpot_p99,
            "recent_steps": {c: [float(row[i]) for row in self.recent_steps]
                             for i, c in enumerate(CALIBRATION_COLUMNS)},
        }
