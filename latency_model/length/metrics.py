"""How good a length prediction is, and the baselines it must beat.

All functions take plain arrays (predicted and actual lengths in tokens) and are pure.
"""

from __future__ import annotations

import numpy as np

BUCKET_QUANTILES = (0.25, 0.5, 0.75, 0.99)
"""Edges of the five length buckets, as quantiles of the training set's lengths (SSJF's buckets)."""


def kendall_tau(predicted, actual) -> float:
    """Kendall's tau-b between predicted and actual lengths, in [-1, 1]; nan for fewer than 2 rows
    or a constant side. Ties (many prompts get the same prediction, many replies the same length)
    are why tau-b and not tau-a."""
    from scipy.stats import kendalltau

    p, a = np.asarray(predicted, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if p.size < 2 or np.all(p == p[0]) or np.all(a == a[0]):
        return float("nan")
    return float(kendalltau(p, a).statistic)


def bucket_edges(train_lengths, quantiles=BUCKET_QUANTILES) -> np.ndarray:
    """Bucket edges (tokens) at `quantiles` of the training lengths: len(quantiles) + 1 buckets."""
    return np.quantile(np.asarray(train_lengths, dtype=np.float64), quantiles)


def bucket_of(lengths, edges) -> np.ndarray:
    """Bucket index in [0, len(edges)] of each length (a length equal to an edge goes up)."""
    return np.searchsorted(np.asarray(edges), np.asarray(lengths, dtype=np.float64), side="right")


def bucket_accuracy(predicted, actual, edges) -> float:
    """Share of rows whose predicted length falls in the actual length's bucket, in [0, 1]."""
    p, a = np.asarray(predicted), np.asarray(actual)
    if p.size == 0:
        return float("nan")
    return float(np.mean(bucket_of(p, edges) == bucket_of(a, edges)))


def mae_tokens(predicted, actual) -> float:
    return float(np.mean(np.abs(np.asarray(predicted, np.float64) - np.asarray(actual, np.float64))))


def report(predicted, actual, edges) -> dict[str, float]:
    """The three numbers `colocate length eval` prints for one predictor."""
    return {"kendall_tau": kendall_tau(predicted, actual),
            "bucket_accuracy": bucket_accuracy(predicted, actual, edges),
            "mae_tokens": mae_tokens(predicted, actual)}
