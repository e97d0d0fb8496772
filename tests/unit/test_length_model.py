"""The output-length predictor: metrics, fit and artifact, online correction, monitor, injection.

The fit is tested on a synthetic corpus where reply length depends on the instruction word and
not on the prompt's size, so a predictor that only counts characters cannot pass; the real
ShareGPT numbers come from `colocate length eval` (README)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from latency_model.length.metrics import bucket_accuracy, bucket_edges, bucket_of, kendall_tau
from latency_model.length.online import OnlineCorrector, QualityMonitor, degrade, template_key
from latency_model.length.predictor import (
    LengthModelError,
    LengthPredictor,
    expected_remaining,
    fit_proxy,
    load_predictor,
    predict_median,
    split_of,
)

INSTRUCTIONS = {"answer yes or no": 4, "translate this sentence": 30, "summarize briefly": 80,
                "write a long essay about": 600}
FILLER = "the of cluster model engine data train request latency queue".split()


def corpus(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = list(INSTRUCTIONS)
    prompts, tokens = [], []
    for _ in range(n):
        k = keys[rng.integers(len(keys))]
        filler = " ".join(rng.choice(FILLER, size=rng.integers(3, 60)))
        prompts.append(f"{k} {filler}")
        tokens.append(max(1, int(INSTRUCTIONS[k] * rng.lognormal(0.0, 0.2))))
    return prompts, np.asarray(tokens)


def test_kendall_tau_and_buckets():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([4, 3, 2, 1], [10, 20, 30, 40]) == pytest.approx(-1.0)
    assert math.isnan(kendall_tau([5, 5, 5], [1, 2, 3]))  # a constant predictor ranks nothing
    edges = bucket_edges(np.arange(1, 101))
    assert len(edges) == 4
    assert list(bucket_of([1, 30, 60, 90, 1000], edges)) == [0, 1, 2, 3, 4]
    assert bucket_accuracy([1, 1000], [2, 999], edges) == 1.0
    assert bucket_accuracy([1, 1000], [999, 2], edges) == 0.0


def test_split_by_id_is_stable_and_roughly_eighty_ten_ten():
    sides = [split_of(f"conv-{i}") for i in range(5000)]
    assert sides == [split_of(f"conv-{i}") for i in range(5000)]
    share = {s: sides.count(s) / len(sides) for s in ("train", "val", "test")}
    assert 0.77 < share["train"] < 0.83 and 0.08 < share["val"] < 0.12 and 0.08 < share["test"] < 0.12


def test_the_proxy_learns_the_instruction_not_the_size_and_its_quantiles_cover():
    tp, tt = corpus(600, 0)
    vp, vt = corpus(200, 1)
    xp, xt = corpus(300, 2)
    pred = fit_proxy(tp, tt, vp, vt)
    assert isinstance(pred, LengthPredictor)
    median = predict_median(pred, xp)
    assert kendall_tau(median, xt) > 0.7
    by_size = kendall_tau([len(p) for p in xp], xt)
    assert abs(by_size) < 0.2  # the size carries nothing here: the fit had to read the words
    q = pred.predict(xp)
    assert q.shape == (len(xp), len(pred.quantiles))
    assert np.all(np.diff(q, axis=1) >= 0)  # quantiles ordered
    p90 = q[:, list(pred.quantiles).index(0.9)]
    assert 0.8 < np.mean(xt <= p90) < 0.98


def test_artifact_round_trip_refuses_overwrite_and_checks_its_version(tmp_path):
    tp, tt = corpus(300, 0)
    vp, vt = corpus(100, 1)
    pred = fit_proxy(tp, tt, vp, vt, meta={"source": {"data": "synthetic"}})
    out = pred.save(tmp_path / "len")
    again = load_predictor(out)
    xp, _ = corpus(50, 3)
    np.testing.assert_allclose(again.predict(xp), pred.predict(xp))
    with pytest.raises(FileExistsError):
        pred.save(out)
    meta = json.loads((out / "meta.json").read_text())
    meta["artifact_version"] = 99
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(LengthModelError, match="artifact_version"):
        load_predictor(out)
    with pytest.raises(LengthModelError, match="not a length predictor"):
        load_predictor(tmp_path / "nothing")


def test_too_little_data_is_refused_with_the_counts():
    with pytest.raises(LengthModelError, match="3 training"):
        fit_proxy(["a", "b", "c"], [1, 2, 3], ["d"] * 30, [1] * 30)


def test_expected_remaining_refreshes_with_tokens_generated():
    residuals = np.log([0.5, 1.0, 2.0])  # lengths 0.5x, 1x, 2x of the point (in 1 + tokens)
    mu = np.log1p(np.array([100.0, 100.0, 100.0, 100.0]))
    left = expected_remaining(mu, residuals, [0, 60, 150, 500])
    assert left[0] > left[1]  # nothing generated: the whole mean
    assert left[2] == pytest.approx(201.0 - 150.0)  # only the 2x length (201) is still ahead
    assert left[3] == 1.0  # past every sampled length: the tail


def test_online_corrector_learns_a_template_and_shrinks_a_new_key():
    c = OnlineCorrector(prior_count=8.0)
    key = template_key("Summarize the following paper in one paragraph: ...")
    for _ in range(50):
        c.observe(key, predicted_tokens=100, actual_tokens=300)
    adjusted = c.adjust([key], [100])[0]
    assert 250 < adjusted < 320
    # Another key inherits only the global bias, shrunk: nowhere near the template's 3x.
    other = c.adjust(["job:other"], [100])[0]
    assert 100 < other < adjusted
    assert c.adjust([None], [100])[0] == pytest.approx(other)


def test_quality_monitor_trusts_good_predictions_and_not_bad_ones():
    rng = np.random.default_rng(0)
    good, bad = QualityMonitor(), QualityMonitor()
    assert good.trust() == 1.0  # before evidence: the offline evaluation's verdict
    for _ in range(200):
        a = float(rng.integers(1, 500))
        good.observe(a * rng.lognormal(0, 0.3), a)
        bad.observe(float(rng.integers(1, 500)), a)
    assert good.tau() > 0.5 and good.trust() == 1.0
    assert abs(bad.tau()) < 0.15 and bad.trust() < 0.3


@pytest.mark.parametrize("target", [0.3, 0.0])
def test_degrade_reaches_its_target_tau(target):
    truth = np.random.default_rng(1).lognormal(5, 1, size=2000)
    noisy = degrade(truth, target, seed=3)
    assert kendall_tau(noisy, truth) == pytest.approx(target, abs=0.05)
    np.testing.assert_array_equal(noisy, degrade(truth, target, seed=3))


def test_degrade_adversarial_reverses_the_order():
    truth = np.array([5.0, 1.0, 9.0, 3.0])
    assert kendall_tau(degrade(truth, "adversarial"), truth) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="target_tau"):
        degrade(truth, 1.5)
