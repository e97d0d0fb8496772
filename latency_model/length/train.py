"""Train and evaluate a length predictor, with the baselines it is read against.

Baselines: `constant` (the training median for every prompt: tau undefined, the MAE to beat)
and `prompt_length` (a least-squares line of log reply tokens on log prompt characters: the
ranking any length-aware scheduler gets for free).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from latency_model.length.data import LengthTable
from latency_model.length.metrics import BUCKET_QUANTILES, bucket_edges, report
from latency_model.length.predictor import ProxyLengthPredictor, fit_proxy, predict_median


def _prompt_length_line(train: LengthTable) -> tuple[float, float]:
    x = np.log1p([len(p) for p in train.prompts])
    slope, intercept = np.polyfit(x, np.log1p(train.tokens), 1)
    return float(slope), float(intercept)


def train_predictor(table: LengthTable, *, source: dict[str, Any]) -> ProxyLengthPredictor:
    s = table.splits()
    tr, va = s["train"], s["val"]
    started = time.perf_counter()
    predictor = fit_proxy(tr.prompts, tr.tokens, va.prompts, va.tokens, meta={"source": source})
    slope, intercept = _prompt_length_line(tr)
    predictor.meta.update({
        "num_rows": {k: len(v.ids) for k, v in s.items()},
        "train_median_tokens": float(np.median(tr.tokens)),
        "bucket_edges_tokens": bucket_edges(tr.tokens).tolist(),
        "bucket_quantiles": list(BUCKET_QUANTILES),
        "prompt_length_line": [slope, intercept],
        "fit_s": round(time.perf_counter() - started, 2),
        "val": report(predict_median(predictor, va.prompts), va.tokens, bucket_edges(tr.tokens)),
    })
    return predictor


def evaluate(predictor: ProxyLengthPredictor, table: LengthTable, *, split: str = "test") -> dict[str, Any]:
    """The predictor and both baselines on one split (`all` for every row), with the cost per prompt."""
    rows = table if split == "all" else table.splits()[split]
    if not rows.ids:
        raise ValueError(f"the {split} split of this table is empty")
    meta = predictor.meta
    edges = np.asarray(meta["bucket_edges_tokens"])
    predict_median(predictor, rows.prompts[:8])  # first call pays imports and allocations, not per-prompt cost
    started = time.perf_counter()
    median = predict_median(predictor, rows.prompts)
    cost_ms = (time.perf_counter() - started) * 1000.0 / len(rows.ids)
    slope, intercept = meta["prompt_length_line"]
    by_length = np.expm1(intercept + slope * np.log1p([len(p) for p in rows.prompts]))
    constant = np.full(len(rows.ids), meta["train_median_tokens"])
    q = predictor.predict(rows.prompts)
    p90 = q[:, list(predictor.quantiles).index(0.9)]
    return {
        "split": split,
        "num_rows": len(rows.ids),
        "predictor": {**report(median, rows.tokens, edges), "p90_coverage": float(np.mean(rows.tokens <= p90)),
                      "cost_ms_per_prompt": round(cost_ms, 4)},
        "prompt_length": report(by_length, rows.tokens, edges),
        "constant": report(constant, rows.tokens, edges),
        "bucket_edges_tokens": edges.tolist(),
    }
