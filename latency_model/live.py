"""A step-latency model learned on the hardware it controls, from the engines' own steps.

Replicas stream every engine step (its batch composition and measured latency) to the
controller. `LiveModelFitter` keeps the most recent of them and refits an XGBoost p50/p99 model on
them, off the controller's tick path. A shipped or profiled model, if there is one, is only a
prior: it labels a grid of batch compositions (the ones the policy asks about), rescaled to this
host's speed (the median of observed / prior-predicted latency over the live steps), and those
pseudo-steps weigh as `prior_weight_steps` real steps at first and less and less as live steps
accumulate (weight P * P / (P + n) in all, for n live steps). Nothing bounds the rescaling, so an
engine several times faster or slower than the prior's is matched.

Trees cannot extrapolate and live data only covers the batches the policy admitted; the
predictions are therefore constrained to be monotone (non-decreasing) in the features that only
add work (tokens, requests, context), so a larger batch is never predicted cheaper than a smaller
one, and the policy's probing (orchestrator.control.policy) explores beyond what was seen.

The p99 head is conformally calibrated on the newest 20% of live steps (held out in time, not at
random: consecutive steps are near-duplicates), and the same steps give the live error that
`colocate status` shows.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from latency_model.features import FEATURE_NAMES, INPUT_COLUMNS, featurize
from latency_model.model import QUANTILES, StepLatencyModel

LIVE_COLUMNS = (*INPUT_COLUMNS, "step_latency_ms")
MONOTONE_FEATURES = frozenset({
    "num_prefill_tokens", "prefill_context_tokens", "prefill_attention_tokens2", "num_decode_reqs",
    "decode_context_tokens", "num_batched_tokens", "num_reqs",
})
"""Features in which step latency never decreases (more tokens, requests or KV read)."""


class Predictor(Protocol):
    def predict_ms(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class LiveFitConfig:
    max_steps: int = 6000
    """Most recent live steps kept (older ones describe the host as it was)."""
    min_steps: int = 200
    """Live steps needed before the first fit."""
    prior_weight_steps: float = 500.0
    """How many live steps the prior's grid counts as before any live step is seen."""
    num_trees: int = 60
    max_depth: int = 6
    learning_rate: float = 0.2
    holdout_frac: float = 0.2


@dataclass
class FitReport:
    """What the model in force was fit on, and how it does on steps it has not seen."""

    source: str
    """'prior' (the shipped/profiled model, unchanged), 'live' (refit on live steps), 'none'."""
    fit_at_s: float | None = None
    num_live_steps: int = 0
    prior_weight: float = 0.0
    """Total weight of the prior's pseudo-steps in the fit (live steps weigh 1 each)."""
    speed_vs_prior: float | None = None
    """Median observed / prior-predicted step latency on live steps (< 1: this host is faster)."""
    holdout_mape: float | None = None
    """Median-head MAPE of this model on the newest live steps, held out of its fit."""
    holdout_p99_coverage: float | None = None
    live_mape: float | None = None
    """Median-head MAPE of the model in force on live steps that arrived after its fit."""
    fit_s: float | None = None
    """Seconds the fit took (off the tick path)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "extra"} | self.extra


def _mape(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.median(np.abs(pred - y) / np.maximum(y, 1e-9)))


def fit_live(live: Mapping[str, np.ndarray], prior: Predictor | None, grid: Mapping[str, np.ndarray] | None,
             cfg: LiveFitConfig = LiveFitConfig(), seed: int = 0) -> tuple[StepLatencyModel, FitReport]:
    """Fit a p50/p99 model on live steps (columns of LIVE_COLUMNS, oldest first) and, when a prior
    is given, on its rescaled predictions over `grid` (candidate batch columns)."""
    import xgboost as xgb

    started = time.perf_counter()
    x_live = featurize(live)
    y_live = np.asarray(live["step_latency_ms"], dtype=np.float64)
    n = len(y_live)
    n_hold = max(1, int(n * cfg.holdout_frac))
    fit_x, fit_y, hold_x, hold_y = x_live[:-n_hold], y_live[:-n_hold], x_live[-n_hold:], y_live[-n_hold:]
    weights = np.ones(len(fit_y))
    speed, prior_weight = None, 0.0
    if prior is not None and grid is not None:
        prior_live, _ = prior.predict_ms(x_live)
        ok = prior_live > 0
        speed = float(np.median(y_live[ok] / prior_live[ok])) if ok.any() else 1.0
        x_grid = featurize(grid)
        y_grid = prior.predict_ms(x_grid)[0] * speed
        p = cfg.prior_weight_steps
        prior_weight = p * p / (p + n)
        fit_x = np.vstack([fit_x, x_grid])
        fit_y = np.concatenate([fit_y, y_grid])
        weights = np.concatenate([weights, np.full(len(y_grid), prior_weight / max(len(y_grid), 1))])
    constraints = "(" + ",".join("1" if f in MONOTONE_FEATURES else "0" for f in FEATURE_NAMES) + ")"
    reg = xgb.XGBRegressor(objective="reg:quantileerror", quantile_alpha=np.array(QUANTILES),
                           n_estimators=cfg.num_trees, max_depth=cfg.max_depth, learning_rate=cfg.learning_rate,
                           tree_method="hist", random_state=seed, n_jobs=1, monotone_constraints=constraints)
    reg.fit(fit_x, fit_y, sample_weight=weights)
    booster = reg.get_booster()
    raw = np.asarray(booster.inplace_predict(hold_x))
    ratio = hold_y / np.maximum(raw[:, 1], 1e-6)
    k = min(int(np.ceil((len(hold_y) + 1) * 0.99)) - 1, len(hold_y) - 1)
    model = StepLatencyModel(booster, float(max(np.sort(ratio)[k], 1.0)), {"source": "live"})
    try:
        from latency_model.fast_trees import CompiledModel

        model.compiled = CompiledModel.from_booster(booster)  # the policy asks thousands of candidates a tick
    except Exception:  # noqa: BLE001 - XGBoost's own predictor is correct, only slower
        model.compiled = None
    p50, p99 = model.predict_ms(hold_x)
    report = FitReport(source="live", num_live_steps=n, prior_weight=prior_weight, speed_vs_prior=speed,
                       holdout_mape=_mape(hold_y, p50), holdout_p99_coverage=float(np.mean(hold_y <= p99)),
                       fit_s=time.perf_counter() - started)
    return model, report


class LiveModelFitter:
    """Collects live steps (thread-safe `add`) and refits on demand (`refit`, run in a thread)."""

    def __init__(self, prior: Predictor | None, cfg: LiveFitConfig = LiveFitConfig(),
                 clock=time.time) -> None:
        self.prior = prior
        self.cfg = cfg
        self.clock = clock
        self._rows: collections.deque[tuple[float, ...]] = collections.deque(maxlen=cfg.max_steps)
        self._lock = threading.Lock()
        self._new_since_fit = 0
        self._since_fit: collections.deque[tuple[float, ...]] = collections.deque(maxlen=2000)
        self.model: Predictor | None = prior
        self.report = FitReport(source="prior" if prior is not None else "none")

    def add(self, columns: Mapping[str, Any] | None) -> int:
        """Append live steps (columns of LIVE_COLUMNS); returns how many were added."""
        if not columns:
            return 0
        try:
            cols = [np.asarray(columns[c], dtype=np.float64) for c in LIVE_COLUMNS]
        except KeyError:
            return 0
        rows = list(zip(*cols))
        with self._lock:
            self._rows.extend(rows)
            self._since_fit.extend(rows)
            self._new_since_fit += len(rows)
        return len(rows)

    @property
    def num_steps(self) -> int:
        return len(self._rows)

    def due(self, min_new_steps: int) -> bool:
        return len(self._rows) >= self.cfg.min_steps and self._new_since_fit >= min_new_steps

    def live_error(self) -> float | None:
        """MAPE of the model in force on steps that arrived after it was fit (None: too few)."""
        with self._lock:
            rows = list(self._since_fit)
        if self.model is None or len(rows) < 20:
            return None
        cols = {c: np.asarray([r[i] for r in rows]) for i, c in enumerate(LIVE_COLUMNS)}
        p50, _ = self.model.predict_ms(featurize(cols))
        return _mape(cols["step_latency_ms"], p50)

    def refit(self, grid: Mapping[str, np.ndarray] | None) -> FitReport | None:
        """Fit on the steps collected so far; swaps the model in force and returns the report.
        Meant to run in a worker thread: only the swap holds the lock."""
        with self._lock:
            rows = list(self._rows)
        if len(rows) < self.cfg.min_steps:
            return None
        live_error = self.live_error()
        cols = {c: np.asarray([r[i] for r in rows]) for i, c in enumerate(LIVE_COLUMNS)}
        model, report = fit_live(cols, self.prior, grid, self.cfg)
        report.fit_at_s = self.clock()
        report.live_mape = live_error
        with self._lock:
            self.model, self.report = model, report
            self._new_since_fit = 0
            self._since_fit.clear()
        return report
