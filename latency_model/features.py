"""The one feature function, used by training (on telemetry rows) and by the controller (on
candidate batches). Both describe a step by the aggregates in `latency_model.schema`.

Beyond HyGen's features (prefill tokens, its square, decode tokens, request counts) it adds
the KV the step reads: decode context tokens and the quadratic prefill attention work, which
dominate step time once contexts grow.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

INPUT_COLUMNS: tuple[str, ...] = (
    "num_prefill_tokens",
    "num_prefill_reqs",
    "prefill_context_tokens",
    "prefill_attention_tokens2",
    "num_decode_reqs",
    "decode_context_tokens",
    "max_decode_context_tokens",
)
"""Per-step aggregates the features are computed from (columns of `latency_model.schema`)."""
FEATURE_NAMES: tuple[str, ...] = (
    *INPUT_COLUMNS,
    "mean_decode_context_tokens",
    "num_batched_tokens",
    "num_reqs",
)


def feature_schema_hash() -> str:
    """Identifies the feature function; a model trained on another one must not be loaded."""
    return hashlib.sha256(",".join(FEATURE_NAMES).encode()).hexdigest()[:16]


def featurize(columns: Mapping[str, np.ndarray]) -> np.ndarray:
    """(n, len(FEATURE_NAMES)) float32 features from per-step aggregate columns (arrays of n)."""
    missing = [c for c in INPUT_COLUMNS if c not in columns]
    if missing:
        raise KeyError(f"featurize needs columns {missing}")
    col = {c: np.asarray(columns[c], dtype=np.float64) for c in INPUT_COLUMNS}
    num_decode = col["num_decode_reqs"]
    mean_decode_ctx = np.divide(col["decode_context_tokens"], num_decode,
                                out=np.zeros_like(num_decode), where=num_decode > 0)
    return np.stack(
        [
            col["num_prefill_tokens"],
            col["num_prefill_reqs"],
            col["prefill_context_tokens"],
            col["prefill_attention_tokens2"],
            num_decode,
            col["decode_context_tokens"],
            col["max_decode_context_tokens"],
            mean_decode_ctx,
            col["num_prefill_tokens"] + num_decode,
            col["num_prefill_reqs"] + num_decode,
        ],
        axis=1,
    ).astype(np.float32)


def hygen_features(columns: Mapping[str, np.ndarray]) -> np.ndarray:
    """HyGen's linear-model features: prefill tokens, its square, decode tokens, request counts."""
    p = np.asarray(columns["num_prefill_tokens"], dtype=np.float64)
    d = np.asarray(columns["num_decode_reqs"], dtype=np.float64)
    return np.stack([p, p * p, d, np.asarray(columns["num_prefill_reqs"], dtype=np.float64), d], axis=1)
