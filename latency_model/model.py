"""XGBoost quantile model of step latency: a median head and a p99 head.

Trained on a step dataset (`latency_model.schema`), with three splits: train, calibration and
hold-out. The p99 head is conformally calibrated (scaled by the calibration split's quantile of
observed / predicted, since CPU and GPU timing noise grows with the step) so that its coverage
holds on data it has not seen; the hold-out split only measures.

The splits take whole blocks of consecutive steps (`step_groups`), not single steps: a step
dataset keeps a `colocate profile` scenario's many near-identical steps (or a stretch of engine
telemetry) next to each other, and a step-level split puts near-duplicates on both sides, which
flatters MAPE and coverage. `train` reports the step-level split's metrics too (`random_split`),
to show by how much.

The artifact is a directory: `model.ubj` (the booster) and `meta.json` (feature schema and its
hash, training-data hash, calibration scale, hold-out metrics). Loading checks all of it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latency_model.features import FEATURE_NAMES, feature_schema_hash, featurize, hygen_features

ARTIFACT_VERSION = 2
QUANTILES = (0.5, 0.99)
MAX_BLOCK_STEPS = 64
"""Longest block of consecutive steps `step_groups` makes, so that telemetry of an engine that
never empties still splits into many blocks (64 steps are ~3 s of the bench model on this CPU)."""
MIN_GROUPS = 10
"""Fewest blocks `train` accepts: enough that hold-out and calibration get whole blocks each and
the fit keeps most of them."""


class ModelFileError(ValueError):
    """A model artifact that cannot be used; the message names the file and the problem."""


def table_hash(table) -> str:
    """Content hash of a training table (column names and values), for the artifact's record."""
    h = hashlib.sha256()
    for name in table.column_names:
        h.update(name.encode())
        h.update(np.ascontiguousarray(table.column(name).to_numpy()).tobytes())
    return h.hexdigest()[:16]


def _columns(table) -> dict[str, np.ndarray]:
    return {name: table.column(name).to_numpy() for name in table.column_names}


def _mape(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean(np.abs(pred - y) / np.maximum(y, 1e-9)))


@dataclass
class StepLatencyModel:
    booster: Any
    p99_scale: float
    meta: dict[str, Any]
    compiled: Any = None
    """`latency_model.fast_trees.CompiledModel` of the same trees (set by `load`), used when present."""

    def predict_ms(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(p50_ms, p99_ms) for each row of `features` (n, len(FEATURE_NAMES)); one call for many
        candidates is much cheaper per candidate than one call each."""
        x = np.asarray(features, dtype=np.float32)
        out = self.compiled.predict(x) if self.compiled is not None else np.asarray(self.booster.inplace_predict(x))
        p50 = out[:, 0]
        p99 = np.maximum(out[:, 1] * self.p99_scale, p50)
        return p50, p99

    def predict_p50_ms(self, features: np.ndarray) -> np.ndarray:
        """`predict_ms(features)[0]` alone, walking only the median head's trees (the controller's
        calibration asks for thousands of past steps per second and uses only the median)."""
        if self.compiled is None:
            return self.predict_ms(features)[0]
        return self.compiled.predict_target(np.asarray(features, dtype=np.float32), 0)

    def predict_columns(self, columns) -> tuple[np.ndarray, np.ndarray]:
        return self.predict_ms(featurize(columns))

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.booster.save_model(str(out / "model.ubj"))
        (out / "meta.json").write_text(json.dumps({**self.meta, "p99_scale": self.p99_scale}, indent=2) + "\n")
        return out


def timing_noise_floor(cols: dict[str, np.ndarray], min_run: int = 5) -> float | None:
    """How much the same batch's step latency varies on this machine: the mean of
    |latency - median of its run| / median over runs of >= `min_run` consecutive pure-decode steps
    with the same batch size (their context grows by one token a step, which is negligible).
    No model can predict single steps better than this on average; None without such runs."""
    lat = np.asarray(cols["step_latency_ms"], dtype=np.float64)
    decode = np.asarray(cols["num_decode_reqs"])
    pure = np.asarray(cols["num_prefill_tokens"]) == 0
    deviations: list[np.ndarray] = []
    start = 0
    for i in range(1, len(lat) + 1):
        if i == len(lat) or not (pure[i] and pure[start] and decode[i] == decode[start]):
            if pure[start] and i - start >= min_run:
                run = lat[start:i]
                med = np.median(run)
                deviations.append(np.abs(run - med) / med)
            start = i
    return float(np.mean(np.concatenate(deviations))) if deviations else None


def step_groups(cols: dict[str, np.ndarray], max_block_steps: int = MAX_BLOCK_STEPS) -> np.ndarray:
    """Block id of each step (0, 1, ... in table order): a block is a run of consecutive steps of
    one batch history, which a split keeps on one side.

    A block starts at a *restart*: a step with no decode requests after a step with some, i.e. the
    engine emptied and a new batch is prefilled from fresh prompts (a new scenario of a `colocate
    profile` sweep; new arrivals after idle in telemetry). A restart whose prefill shape
    (`num_prefill_reqs`, `num_prefill_tokens`) repeats the previous restart's does not start one:
    the tail of a sweep scenario re-injects the same prompt every few steps, and those repeats are
    near-duplicates of each other. A block also ends after `max_block_steps` steps. Deterministic:
    the same table always gives the same blocks."""
    decode = np.asarray(cols["num_decode_reqs"])
    n = len(decode)
    starts = np.zeros(n, dtype=bool)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts[0] = True
    restarts = np.flatnonzero((decode[1:] == 0) & (decode[:-1] > 0)) + 1
    shape = np.c_[np.asarray(cols["num_prefill_reqs"])[restarts], np.asarray(cols["num_prefill_tokens"])[restarts]]
    new_shape = np.ones(len(restarts), dtype=bool)
    new_shape[1:] = np.any(shape[1:] != shape[:-1], axis=1)
    starts[restarts[new_shape]] = True
    index = np.arange(n)
    block_start = np.maximum.accumulate(np.where(starts, index, 0))
    starts |= (index - block_start) % max_block_steps == 0
    return np.cumsum(starts) - 1


def split_groups(groups: np.ndarray, *, seed: int, holdout_frac: float = 0.2,
                 calib_frac: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hold-out, calibration, fit) row indices, each a union of whole groups: the groups in a
    seeded random order go to hold-out until it has `holdout_frac` of the rows, then to
    calibration until the two have `holdout_frac + calib_frac`, the rest to the fit (each of the
    three gets at least one group). `groups` = `np.arange(n)` is the step-level random split."""
    groups = np.asarray(groups)
    num_groups = int(groups.max()) + 1
    if num_groups < 3:
        raise ValueError(f"{num_groups} groups cannot be split three ways")
    order = np.random.default_rng(seed).permutation(num_groups)
    rows = np.cumsum(np.bincount(groups, minlength=num_groups)[order])
    n_hold = int(np.clip(np.searchsorted(rows, holdout_frac * len(groups)) + 1, 1, num_groups - 2))
    n_cal = int(np.clip(np.searchsorted(rows, (holdout_frac + calib_frac) * len(groups)) + 1,
                        n_hold + 1, num_groups - 1))
    role = np.full(num_groups, 2)
    role[order[:n_hold]] = 0
    role[order[n_hold:n_cal]] = 1
    side = role[groups]
    return np.flatnonzero(side == 0), np.flatnonzero(side == 1), np.flatnonzero(side == 2)


def _fit(x: np.ndarray, y: np.ndarray, lin_x: np.ndarray, hold: np.ndarray, cal: np.ndarray, fit: np.ndarray,
         *, seed: int, num_trees: int, max_depth: int, learning_rate: float) -> tuple[StepLatencyModel, dict[str, float]]:
    """Fit on `fit`, calibrate the p99 head on `cal`, measure on `hold`."""
    import xgboost as xgb

    reg = xgb.XGBRegressor(objective="reg:quantileerror", quantile_alpha=np.array(QUANTILES),
                           n_estimators=num_trees, max_depth=max_depth, learning_rate=learning_rate,
                           tree_method="hist", random_state=seed, n_jobs=1)
    reg.fit(x[fit], y[fit])
    booster = reg.get_booster()
    raw_cal = np.asarray(booster.inplace_predict(x[cal]))
    # Conformal scale: the smallest factor under which 99% of calibration steps are covered.
    ratio = y[cal] / np.maximum(raw_cal[:, 1], 1e-6)
    k = min(int(np.ceil((len(cal) + 1) * 0.99)) - 1, len(cal) - 1)
    scale = float(max(np.sort(ratio)[k], 1.0))
    model = StepLatencyModel(booster, scale, {})

    p50, p99 = model.predict_ms(x[hold])
    coef, *_ = np.linalg.lstsq(lin_x[fit], y[fit], rcond=None)
    return model, {
        "median_mape": _mape(y[hold], p50),
        "p99_coverage": float(np.mean(y[hold] <= p99)),
        "linear_hygen_mape": _mape(y[hold], lin_x[hold] @ coef),
    }


def train(table, *, seed: int = 0, num_trees: int = 100, max_depth: int = 6, learning_rate: float = 0.15,
          holdout_frac: float = 0.2, calib_frac: float = 0.2) -> tuple[StepLatencyModel, dict[str, Any]]:
    """Fit the model on a step table, holding out whole blocks of consecutive steps
    (`step_groups`); return it with its hold-out metrics.

    The metrics are the grouped split's (`median_mape`, `p99_coverage`, `linear_hygen_mape`,
    `num_holdout` steps; `split` "grouped", `num_groups`), the same three of a second model fit on
    a step-level random split (`random_split`, for comparison only: near-duplicate steps on both
    sides flatter it), and the `timing_noise_floor`."""
    cols = _columns(table)
    y = np.asarray(cols["step_latency_ms"], dtype=np.float64)
    x = featurize(cols)
    n = len(y)
    if n < 50:
        raise ValueError(f"{n} steps are too few to train and hold out (need at least 50)")
    groups = step_groups(cols)
    num_groups = int(groups[-1]) + 1
    if num_groups < MIN_GROUPS:
        raise ValueError(f"{n} steps form only {num_groups} blocks of consecutive steps, too few to hold "
                         f"whole blocks out (need at least {MIN_GROUPS})")
    lin_x = np.c_[hygen_features(cols), np.ones(n)]
    hyper = {"seed": seed, "num_trees": num_trees, "max_depth": max_depth, "learning_rate": learning_rate}
    fractions = {"holdout_frac": holdout_frac, "calib_frac": calib_frac}

    hold, cal, fit = split_groups(groups, seed=seed, **fractions)
    model, grouped = _fit(x, y, lin_x, hold, cal, fit, **hyper)
    _, random_split = _fit(x, y, lin_x, *split_groups(np.arange(n), seed=seed, **fractions), **hyper)
    metrics: dict[str, Any] = {
        "num_steps": n, "num_holdout": len(hold), "split": "grouped", "num_groups": num_groups,
        **grouped,
        "random_split": random_split,
        "timing_noise_floor": timing_noise_floor(cols),
    }
    model.meta = {
        "artifact_version": ARTIFACT_VERSION,
        "feature_names": list(FEATURE_NAMES),
        "feature_schema_hash": feature_schema_hash(),
        "quantiles": list(QUANTILES),
        "training_data_hash": table_hash(table),
        "holdout_metrics": metrics,
        "seed": seed,
    }
    return model, metrics


def load(path: str | Path) -> StepLatencyModel:
    """Load an artifact directory, failing loudly on anything that does not match this code."""
    import xgboost as xgb

    p = Path(path)
    meta_path, model_path = p / "meta.json", p / "model.ubj"
    for f in (meta_path, model_path):
        if not f.is_file():
            raise ModelFileError(f"{f}: missing (is {p} a model directory written by `colocate train`?)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ModelFileError(f"{meta_path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if meta.get("artifact_version") != ARTIFACT_VERSION:
        raise ModelFileError(f"{meta_path}: artifact version {meta.get('artifact_version')}, expected {ARTIFACT_VERSION}")
    if meta.get("feature_names") != list(FEATURE_NAMES) or meta.get("feature_schema_hash") != feature_schema_hash():
        raise ModelFileError(
            f"{meta_path}: feature schema {meta.get('feature_schema_hash')} does not match this code's "
            f"{feature_schema_hash()} ({meta.get('feature_names')} vs {list(FEATURE_NAMES)}); retrain the model")
    booster = xgb.Booster()
    try:
        booster.load_model(str(model_path))
    except xgb.core.XGBoostError as err:
        raise ModelFileError(f"{model_path}: not a loadable XGBoost model ({str(err).splitlines()[0]})") from None
    if booster.num_features() != len(FEATURE_NAMES):
        raise ModelFileError(f"{model_path}: expects {booster.num_features()} features, not {len(FEATURE_NAMES)}")
    from latency_model.fast_trees import CompiledModel

    return StepLatencyModel(booster, float(meta["p99_scale"]), meta, CompiledModel.from_booster(booster))
