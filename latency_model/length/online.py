"""Length prediction that keeps learning, knows when it is wrong, and can be made wrong on purpose.

- `OnlineCorrector`: learns from the system's own completed requests. Each (key, predicted,
  actual) moves a per-key bias in log space, shrunk toward the global bias by how few
  completions the key has (`prior_count`); the key is a batch job's id, or a template key (a
  hash of the prompt's first characters) for chat, since a job's requests often share a
  template and a template's replies share a length the proxy model cannot see.
- `QualityMonitor`: rank correlation of predicted vs actual over the recent completions, and
  from it a trust weight in [0, 1]: schedulers blend predicted order toward FCFS as it falls.
- `degrade`: error injection for the bench, predictions mixed with noise to a target Kendall
  tau against the truth, or reversed (adversarial).

All pure state machines over explicit inputs: no clock, no I/O.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from latency_model.length.metrics import kendall_tau

TEMPLATE_CHARS = 64
"""A prompt's template key is a hash of this many leading characters."""


def template_key(prompt: str) -> str:
    return "tpl:" + hashlib.sha1(prompt[:TEMPLATE_CHARS].encode()).hexdigest()[:12]


@dataclass
class _KeyStats:
    count: int = 0
    mean_residual: float = 0.0


@dataclass
class OnlineCorrector:
    """Per-key bias in log(1 + tokens), learned from completions.

    correction(key) = (n * key_mean + prior_count * global_mean) / (n + prior_count): a key seen
    a few times barely moves; one seen many times follows its own replies. Means are
    exponentially weighted (`decay` per completion) so a drifting workload is followed.
    """

    prior_count: float = 8.0
    decay: float = 0.02
    max_keys: int = 4096
    global_stats: _KeyStats = field(default_factory=_KeyStats)
    keys: dict[str, _KeyStats] = field(default_factory=dict)

    def observe(self, key: str | None, predicted_tokens: float, actual_tokens: float) -> None:
        r = math.log1p(max(actual_tokens, 0.0)) - math.log1p(max(predicted_tokens, 0.0))
        self._update(self.global_stats, r)
        if key is None:
            return
        stats = self.keys.get(key)
        if stats is None:
            if len(self.keys) >= self.max_keys:  # forget the least-seen key
                self.keys.pop(min(self.keys, key=lambda k: self.keys[k].count))
            stats = self.keys[key] = _KeyStats()
        self._update(stats, r)

    def _update(self, s: _KeyStats, r: float) -> None:
        s.count += 1
        w = max(1.0 / s.count, self.decay)
        s.mean_residual += w * (r - s.mean_residual)

    def correction(self, key: str | None) -> float:
        """Additive log-space correction for a request with this key."""
        g = self.global_stats.mean_residual * self.global_stats.count / (self.global_stats.count + self.prior_count)
        s = self.keys.get(key) if key is not None else None
        if s is None:
            return g
        return (s.count * s.mean_residual + self.prior_count * g) / (s.count + self.prior_count)

    def adjust(self, keys: Sequence[str | None], predicted_tokens) -> np.ndarray:
        p = np.asarray(predicted_tokens, dtype=np.float64)
        c = np.asarray([self.correction(k) for k in keys], dtype=np.float64)
        return np.maximum(np.expm1(np.log1p(p) + c), 1.0)


@dataclass
class QualityMonitor:
    """Kendall tau of predicted vs actual over the last `window` completions.

    trust() is 1 at or above `good_tau`, 0 at or below `poor_tau`, linear between; with fewer
    than `min_samples` completions it is `initial_trust` (the offline evaluation's verdict)."""

    window: int = 200
    min_samples: int = 30
    poor_tau: float = 0.1
    good_tau: float = 0.3
    initial_trust: float = 1.0
    _pairs: deque = field(default_factory=deque)

    def observe(self, predicted_tokens: float, actual_tokens: float) -> None:
        self._pairs.append((float(predicted_tokens), float(actual_tokens)))
        while len(self._pairs) > self.window:
            self._pairs.popleft()

    @property
    def num_samples(self) -> int:
        return len(self._pairs)

    def tau(self) -> float | None:
        if len(self._pairs) < self.min_samples:
            return None
        p, a = zip(*self._pairs)
        t = kendall_tau(p, a)
        return None if math.isnan(t) else t

    def trust(self) -> float:
        t = self.tau()
        if t is None:
            return self.initial_trust if len(self._pairs) < self.min_samples else 0.0
        return float(np.clip((t - self.poor_tau) / (self.good_tau - self.poor_tau), 0.0, 1.0))


def degrade(truth_tokens, target_tau: float | str, seed: int = 0, tolerance: float = 0.02) -> np.ndarray:
    """Predictions for the error-injection bench: `truth_tokens` mixed with log-normal noise whose
    scale is searched (bisection) until Kendall tau against the truth is within `tolerance` of
    `target_tau`; "adversarial" reverses the true order (tau = -1). Same seed, same output."""
    truth = np.asarray(truth_tokens, dtype=np.float64)
    if target_tau == "adversarial":
        return float(truth.max() + truth.min()) - truth
    target = float(target_tau)
    if not -1.0 <= target <= 1.0:
        raise ValueError(f"target_tau must be in [-1, 1] or 'adversarial', got {target_tau!r}")
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(truth.size)
    log_truth = np.log1p(truth)
    spread = float(np.std(log_truth)) or 1.0

    def noisy(scale: float) -> np.ndarray:
        return np.expm1(log_truth + scale * spread * z)

    if target <= 0.0:
        # Independent of the truth: a permutation of the true lengths (tau ~ 0 up to sampling).
        return rng.permutation(truth)
    lo, hi = 0.0, 64.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        t = kendall_tau(noisy(mid), truth)
        if abs(t - target) <= tolerance:
            return noisy(mid)
        lo, hi = (mid, hi) if t > target else (lo, mid)
    return noisy(0.5 * (lo + hi))
