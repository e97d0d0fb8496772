"""The live step-latency model: learned from an engine's own steps, matching a host several times
faster (or slower) than its prior, with the prior fading as live steps accumulate."""

from __future__ import annotations

import numpy as np
import pytest

from latency_model.features import FEATURE_NAMES
from latency_model.live import LiveFitConfig, LiveModelFitter, fit_live
from orchestrator.config import PolicyConfig
from orchestrator.control.policy import candidate_grid
from orchestrator.control.snapshot import ReplicaLoad

IDX = {n: i for i, n in enumerate(FEATURE_NAMES)}


class Prior:
    """A model profiled on a slow host: 40 ms + 6 ms per decode + 0.2 ms per prefill token."""

    def predict_ms(self, x):
        p50 = 40.0 + 6.0 * x[:, IDX["num_decode_reqs"]] + 0.2 * x[:, IDX["num_prefill_tokens"]]
        return p50, 1.3 * p50


def host_ms(decodes, prefill, rng):
    """This host: 5x faster than the prior's, with 5% timing noise."""
    return (8.0 + 1.2 * decodes + 0.04 * prefill) * rng.normal(1.0, 0.05, size=len(decodes))


def live_steps(n, rng, max_decodes=24):
    decodes = rng.integers(1, max_decodes + 1, size=n).astype(float)
    prefill = np.where(rng.random(n) < 0.3, rng.choice([32.0, 64.0, 128.0], size=n), 0.0)
    zeros = np.zeros(n)
    return {
        "num_prefill_tokens": prefill, "num_prefill_reqs": (prefill > 0).astype(float),
        "prefill_context_tokens": zeros, "prefill_attention_tokens2": prefill * prefill / 2,
        "num_decode_reqs": decodes, "decode_context_tokens": decodes * 200.0,
        "max_decode_context_tokens": np.where(decodes > 0, 200.0, 0.0),
        "step_latency_ms": host_ms(decodes, prefill, rng),
    }


def test_a_host_five_times_faster_than_the_prior_is_matched_from_live_steps():
    rng = np.random.default_rng(0)
    grid = candidate_grid(ReplicaLoad("r", num_online=2, online_context_tokens=400.0), PolicyConfig())
    model, report = fit_live(live_steps(1500, rng), Prior(), grid)
    assert report.speed_vs_prior == pytest.approx(0.2, rel=0.15)
    test = live_steps(400, np.random.default_rng(1))
    from latency_model.features import featurize

    p50, p99 = model.predict_ms(featurize(test))
    truth = 8.0 + 1.2 * test["num_decode_reqs"] + 0.04 * test["num_prefill_tokens"]
    assert np.median(np.abs(p50 - truth) / truth) < 0.1
    assert np.mean(test["step_latency_ms"] <= p99) > 0.9
    assert report.holdout_mape < 0.15


def test_larger_batches_than_any_live_step_are_not_predicted_cheaper():
    """Trees cannot extrapolate: monotone constraints (and the prior's rescaled grid) keep a batch
    larger than any seen at least as expensive as the largest seen."""
    rng = np.random.default_rng(2)
    grid = candidate_grid(ReplicaLoad("r"), PolicyConfig())
    model, _ = fit_live(live_steps(1200, rng, max_decodes=8), Prior(), grid)
    from latency_model.features import featurize

    cols = live_steps(64, rng)
    cols["num_decode_reqs"] = np.arange(1, 65, dtype=float)
    cols["num_prefill_tokens"] = np.zeros(64)
    cols["num_prefill_reqs"] = np.zeros(64)
    cols["prefill_attention_tokens2"] = np.zeros(64)
    cols["decode_context_tokens"] = cols["num_decode_reqs"] * 200.0
    p50, _ = model.predict_ms(featurize(cols))
    assert np.all(np.diff(p50) >= -1e-6)
    assert p50[-1] > 1.5 * p50[7]  # the prior's slope (rescaled) carries beyond the live range


def test_the_prior_fades_as_live_steps_accumulate_and_the_fitter_swaps_the_model():
    rng = np.random.default_rng(3)
    grid = candidate_grid(ReplicaLoad("r"), PolicyConfig())
    fitter = LiveModelFitter(Prior(), LiveFitConfig(min_steps=200), clock=lambda: 100.0)
    assert fitter.model is fitter.prior and fitter.report.source == "prior"
    assert fitter.refit(grid) is None  # too few steps
    fitter.add(live_steps(300, rng))
    first = fitter.refit(grid)
    assert first.source == "live" and fitter.model is not fitter.prior and first.fit_at_s == 100.0
    fitter.add(live_steps(3000, rng))
    assert fitter.due(min_new_steps=100)
    second = fitter.refit(grid)
    assert second.prior_weight < first.prior_weight / 4  # P*P/(P+n): 312 at n = 300, 66 at 3,300
    assert not fitter.due(min_new_steps=100)
    fitter.add(live_steps(100, rng))
    assert fitter.live_error() < 0.15
    assert fitter.add(None) == 0 and fitter.add({"num_decode_reqs": [1.0]}) == 0
