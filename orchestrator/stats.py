"""One definition of the statistics that the controller, the benchmark and the tests share.

A p99 is numpy's default ("linear") percentile everywhere: the controller holds the replicas'
observed p99 against the SLO with the same number the benchmark reports, so a run that reads
"p99 at 0.97 of the SLO" in the bench is the run the controller saw at 0.97.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between order statistics; None if empty."""
    a = np.asarray(list(values), dtype=np.float64)
    return float(np.percentile(a, q)) if a.size else None


def p99(values: Iterable[float]) -> float | None:
    return percentile(values, 99.0)


def wilson_interval(num_met: int, num: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z = 1.96) Wilson score interval of a share num_met / num: at 100 requests a 99% bar
    is a question of one request, and the interval says how far a single run can be trusted."""
    if num == 0:
        return 0.0, 1.0
    share = num_met / num
    centre = (share + z * z / (2 * num)) / (1 + z * z / num)
    half = z * math.sqrt(share * (1 - share) / num + z * z / (4 * num * num)) / (1 + z * z / num)
    return max(0.0, centre - half), min(1.0, centre + half)
