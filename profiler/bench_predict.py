"""Prediction cost of the step-latency model: what the controller pays per candidate batch.

Measures, for a trained artifact, the latency of one vectorized call on `num_candidates` candidate
batch compositions (the controller evaluates its whole candidate grid in such calls) and the
per-candidate cost, with XGBoost's `inplace_predict` and with the compiled evaluation
(`latency_model.fast_trees`), after checking that both give the same outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def _time_calls(fn: Callable[[], object], repeats: int) -> np.ndarray:
    for _ in range(min(50, repeats)):
        fn()
    out = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter_ns()
        fn()
        out[i] = (time.perf_counter_ns() - start) / 1000.0
    return out


def candidate_features(num: int, seed: int = 0) -> np.ndarray:
    """Candidate compositions like the controller's grid: online and offline decodes, a chunk."""
    from latency_model.features import featurize
    from orchestrator.control.policy import _candidate_columns

    rng = np.random.default_rng(seed)
    k = rng.integers(0, 32, num).astype(float)
    s = rng.integers(0, 32, num).astype(float)
    chunk = rng.choice([0, 16, 32, 64, 128, 256], num).astype(float)
    cols = _candidate_columns(k, rng.uniform(16, 512, num), s, rng.uniform(16, 512, num), chunk)
    return featurize(cols)


def benchmark(model, *, num_candidates: int = 64, repeats: int = 2000) -> dict[str, float]:
    from latency_model.fast_trees import CompiledModel

    x = candidate_features(num_candidates)
    compiled = CompiledModel.from_booster(model.booster)
    reference = np.asarray(model.booster.inplace_predict(x))
    fast = compiled.predict(x)
    max_abs_diff = float(np.max(np.abs(reference - fast)))
    xgb_us = _time_calls(lambda: model.booster.inplace_predict(x), repeats)
    fast_us = _time_calls(lambda: compiled.predict(x), repeats)
    single_us = _time_calls(lambda: compiled.predict(x[:1]), repeats)
    return {
        "num_candidates": num_candidates,
        "num_trees": compiled.num_trees,
        "max_abs_diff_ms": max_abs_diff,
        "xgboost_call_us_p50": float(np.median(xgb_us)),
        "xgboost_per_candidate_us": float(np.median(xgb_us)) / num_candidates,
        "compiled_call_us_p50": float(np.median(fast_us)),
        "compiled_call_us_p99": float(np.percentile(fast_us, 99)),
        "compiled_per_candidate_us": float(np.median(fast_us)) / num_candidates,
        "compiled_single_call_us_p50": float(np.median(single_us)),
    }


def format_report(r: dict[str, float]) -> str:
    return "\n".join([
        f"prediction cost, {r['num_candidates']} candidates per call, {r['num_trees']} trees (p50 of many calls):",
        f"  XGBoost inplace_predict   {r['xgboost_call_us_p50']:8.1f} us/call  {r['xgboost_per_candidate_us']:6.2f} us/candidate",
        f"  compiled trees            {r['compiled_call_us_p50']:8.1f} us/call  {r['compiled_per_candidate_us']:6.2f} us/candidate"
        f"  (p99 {r['compiled_call_us_p99']:.1f} us/call)",
        f"  compiled, one candidate   {r['compiled_single_call_us_p50']:8.1f} us/call",
        f"  max |compiled - XGBoost|  {r['max_abs_diff_ms']:.2e} ms",
    ])
