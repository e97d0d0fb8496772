"""The length predictor's protocol and its CPU implementation, a proxy model over the prompt.

`LengthPredictor.predict(prompts)` returns, for each prompt, quantiles of the reply's length in
tokens of the served model's tokenizer. Schedulers order by the median (`predict_median`) and
refresh it as tokens come out (`expected_remaining`, from the same residual distribution).

`ProxyLengthPredictor` (SSJF's "proxy model", without hub weights this machine cannot fetch):
- features: TF-IDF-weighted hashed word 1-2-grams of the whole prompt and of its head (the
  instruction is usually at the start: "write an essay", "translate", "yes or no"), hashed
  character 2-4-grams of the head (the language and the script, which move reply lengths a lot
  in ShareGPT), and a few counts (prompt length, lines, question marks, code fences, digits);
- a ridge regression of log(1 + tokens), fitted on the training split;
- quantiles: the validation split's residuals in log space (a split-conformal band), so the p99
  is a p99 on prompts the fit did not see.
Hashing keeps the artifact small and needs no vocabulary: the artifact is the IDF vectors, the
coefficients and the residuals (`predictor.npz`) with `meta.json`; no pickle.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

ARTIFACT_VERSION = 1
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
HEAD_CHARS = 300
"""The head view: the first characters of a prompt, where the instruction usually sits."""
MAX_PROMPT_CHARS = 4000
"""Longer prompts are read to this many characters (pasted documents say little more about the
reply's length than their size, which the counts keep)."""
WORD_FEATURES = 2**16
CHAR_FEATURES = 2**16


class LengthModelError(ValueError):
    """A length-predictor artifact or training table that cannot be used; says which and why."""


@runtime_checkable
class LengthPredictor(Protocol):
    """Prompts in; quantiles (tokens, >= 1) of each reply's length out, shape (n, len(quantiles))."""

    quantiles: tuple[float, ...]

    def predict(self, prompts: Sequence[str]) -> np.ndarray: ...


def predict_median(predictor: LengthPredictor, prompts: Sequence[str]) -> np.ndarray:
    q = list(predictor.quantiles)
    return predictor.predict(prompts)[:, q.index(0.5)]


_COUNT_PATTERNS = [re.compile(p) for p in (r"\n", r"\?", r"```", r"\d+")]
_NUM_COUNTS = 6


def _counts(prompts: Sequence[str]) -> np.ndarray:
    """Dense per-prompt counts, log-scaled: length in characters and words, lines, question
    marks, code fences, digit runs."""
    out = np.empty((len(prompts), _NUM_COUNTS), dtype=np.float64)
    for i, p in enumerate(prompts):
        out[i, 0] = len(p)
        out[i, 1] = len(p.split())
        for j, pat in enumerate(_COUNT_PATTERNS):
            out[i, 2 + j] = len(pat.findall(p[:MAX_PROMPT_CHARS]))
    return np.log1p(out)


def _vectorizers():
    from sklearn.feature_extraction.text import HashingVectorizer

    words = HashingVectorizer(n_features=WORD_FEATURES, ngram_range=(1, 2), alternate_sign=False, norm=None)
    chars = HashingVectorizer(n_features=CHAR_FEATURES, analyzer="char_wb", ngram_range=(2, 4),
                              alternate_sign=False, norm=None)
    return words, chars


def _raw_views(prompts: Sequence[str]) -> list:
    """The three sparse count views (whole prompt words, head words, head characters)."""
    words, chars = _vectorizers()
    whole = [p[:MAX_PROMPT_CHARS] for p in prompts]
    head = [p[:HEAD_CHARS] for p in prompts]
    return [words.transform(whole), words.transform(head), chars.transform(head)]


def _idf(view, num_docs: int) -> np.ndarray:
    """Smoothed IDF (as scikit-learn's TfidfTransformer computes it) from a training view."""
    df = np.bincount(view.indices, minlength=view.shape[1]).astype(np.float64)
    return np.log((1.0 + num_docs) / (1.0 + df)) + 1.0


def _weighted(view, idf: np.ndarray):
    """Sublinear TF times IDF, rows L2-normalized (a long prompt does not outweigh a short one)."""
    from scipy import sparse

    v = view.astype(np.float64).tocsr(copy=True)
    v.data = (1.0 + np.log(v.data)) * idf[v.indices]
    norms = np.sqrt(np.asarray(v.multiply(v).sum(axis=1)).ravel())
    return sparse.diags(1.0 / np.maximum(norms, 1e-12)) @ v


def _design(prompts: Sequence[str], idfs: Sequence[np.ndarray], count_mean: np.ndarray, count_std: np.ndarray):
    from scipy import sparse

    views = [_weighted(v, idf) for v, idf in zip(_raw_views(prompts), idfs)]
    counts = (_counts(prompts) - count_mean) / count_std
    return sparse.hstack([*views, sparse.csr_matrix(counts)]).tocsr()


@dataclass
class ProxyLengthPredictor:
    idfs: list[np.ndarray]
    count_mean: np.ndarray
    count_std: np.ndarray
    coef: np.ndarray
    intercept: float
    residuals: np.ndarray
    """Validation residuals, log(1 + actual) - predicted log(1 + tokens), sorted."""
    meta: dict[str, Any] = field(default_factory=dict)
    quantiles: tuple[float, ...] = QUANTILES

    def predict_log(self, prompts: Sequence[str]) -> np.ndarray:
        """Point prediction of log(1 + tokens) for each prompt."""
        if len(prompts) == 0:
            return np.zeros(0)
        x = _design(list(prompts), self.idfs, self.count_mean, self.count_std)
        return np.asarray(x @ self.coef).ravel() + self.intercept

    def predict(self, prompts: Sequence[str]) -> np.ndarray:
        mu = self.predict_log(prompts)
        offsets = np.quantile(self.residuals, self.quantiles)
        return np.maximum(np.expm1(mu[:, None] + offsets[None, :]), 1.0)

    def expected_remaining(self, prompts: Sequence[str], num_generated: Sequence[int]) -> np.ndarray:
        """E[length - generated | length > generated] per request: TRAIL's refreshed prediction,
        from this prompt's predicted distribution (its log point plus the residuals)."""
        return expected_remaining(self.predict_log(prompts), self.residuals, num_generated)

    def save(self, out_dir: str | Path, *, overwrite: bool = False) -> Path:
        out = Path(out_dir)
        if (out / "meta.json").exists() and not overwrite:
            raise FileExistsError(f"{out} already holds a length predictor (pass overwrite to replace it)")
        out.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out / "predictor.npz", idf_whole=self.idfs[0], idf_head=self.idfs[1],
                            idf_chars=self.idfs[2], count_mean=self.count_mean, count_std=self.count_std,
                            coef=self.coef, residuals=self.residuals)
        meta = {**self.meta, "artifact_version": ARTIFACT_VERSION, "kind": "proxy-ridge",
                "intercept": self.intercept, "quantiles": list(self.quantiles),
                "features": {"word": WORD_FEATURES, "char": CHAR_FEATURES, "head_chars": HEAD_CHARS,
                             "max_prompt_chars": MAX_PROMPT_CHARS}}
        (out / "meta.json").write_text(json.dumps(meta, indent=2))
        return out


def expected_remaining(mu_log: np.ndarray, residuals: np.ndarray, num_generated: Sequence[int]) -> np.ndarray:
    """For each request (log point `mu_log`, `num_generated` tokens out so far): the mean of
    (L - generated) over the residual distribution's lengths L = expm1(mu + r) that exceed what
    was generated. A request that has outrun every sampled length gets 1 (it is in the tail:
    nothing says how long it has left, and it must not jump ahead of everything)."""
    mu = np.asarray(mu_log, dtype=np.float64)[:, None]
    g = np.asarray(num_generated, dtype=np.float64)[:, None]
    lengths = np.expm1(mu + np.asarray(residuals, dtype=np.float64)[None, :])
    alive = lengths > g
    left = np.where(alive, lengths - g, 0.0).sum(axis=1)
    count = alive.sum(axis=1)
    return np.where(count > 0, left / np.maximum(count, 1), 1.0)


def load_residuals(path: str | Path) -> np.ndarray:
    """Only the validation residuals (sorted, log space) of the predictor at `path`: what an
    engine needs to refresh a running request's prediction (`expected_remaining`) from the
    level it arrived with, without loading the feature vectors."""
    arrays_path = Path(path) / "predictor.npz"
    if not arrays_path.is_file():
        raise LengthModelError(f"{path}: not a length predictor (no predictor.npz)")
    with np.load(arrays_path) as z:
        if "residuals" not in z:
            raise LengthModelError(f"{arrays_path}: no residuals")
        return np.sort(np.asarray(z["residuals"], dtype=np.float64))


def load_predictor(path: str | Path) -> ProxyLengthPredictor:
    root = Path(path)
    meta_path, arrays_path = root / "meta.json", root / "predictor.npz"
    if not meta_path.is_file() or not arrays_path.is_file():
        raise LengthModelError(f"{root}: not a length predictor (needs meta.json and predictor.npz; "
                               "build one with `colocate length train`)")
    meta = json.loads(meta_path.read_text())
    if meta.get("artifact_version") != ARTIFACT_VERSION:
        raise LengthModelError(f"{meta_path}: artifact_version {meta.get('artifact_version')}, "
                               f"this code reads {ARTIFACT_VERSION}; retrain it")
    expected = {"word": WORD_FEATURES, "char": CHAR_FEATURES, "head_chars": HEAD_CHARS,
                "max_prompt_chars": MAX_PROMPT_CHARS}
    if meta.get("features") != expected:
        raise LengthModelError(f"{meta_path}: features {meta.get('features')} differ from this code's "
                               f"{expected}; retrain it")
    with np.load(arrays_path) as z:
        return ProxyLengthPredictor(
            idfs=[z["idf_whole"], z["idf_head"], z["idf_chars"]], count_mean=z["count_mean"],
            count_std=z["count_std"], coef=z["coef"], intercept=float(meta["intercept"]),
            residuals=z["residuals"], meta=meta, quantiles=tuple(meta["quantiles"]))


def fit_proxy(train_prompts: Sequence[str], train_tokens, val_prompts: Sequence[str], val_tokens, *,
              alpha: float = 3.0, meta: dict[str, Any] | None = None) -> ProxyLengthPredictor:
    """Fit on the training split; the validation split gives the residuals the quantiles come from.
    `alpha` is the ridge penalty (on unit-norm TF-IDF rows and standardized counts)."""
    from sklearn.linear_model import Ridge

    train_prompts, val_prompts = list(train_prompts), list(val_prompts)
    y = np.log1p(np.asarray(train_tokens, dtype=np.float64))
    yv = np.log1p(np.asarray(val_tokens, dtype=np.float64))
    if len(train_prompts) < 50 or len(val_prompts) < 20:
        raise LengthModelError(f"too little data to fit a length predictor: {len(train_prompts)} training and "
                               f"{len(val_prompts)} validation rows (needs at least 50 and 20)")
    views = _raw_views(train_prompts)
    idfs = [_idf(v, len(train_prompts)) for v in views]
    counts = _counts(train_prompts)
    mean, std = counts.mean(axis=0), np.maximum(counts.std(axis=0), 1e-9)
    x = _design(train_prompts, idfs, mean, std)
    ridge = Ridge(alpha=alpha).fit(x, y)
    predictor = ProxyLengthPredictor(idfs=idfs, count_mean=mean, count_std=std,
                                     coef=np.asarray(ridge.coef_, dtype=np.float64),
                                     intercept=float(ridge.intercept_), residuals=np.zeros(1), meta=dict(meta or {}))
    predictor.residuals = np.sort(yv - predictor.predict_log(val_prompts))
    return predictor


def split_of(key: str, *, val_share: float = 0.1, test_share: float = 0.1) -> str:
    """'train', 'val' or 'test' for a row's id: a hash, so the split is stable across runs and
    machines and a row never changes side when others are added."""
    h = int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / float(16**12)
    if h < test_share:
        return "test"
    if h < test_share + val_share:
        return "val"
    return "train"
