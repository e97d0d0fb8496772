"""A compiled evaluation of the same XGBoost trees, for the controller's many small calls.

XGBoost's `inplace_predict` pays a fixed cost per call that dominates when a call holds a few
dozen candidates. This flattens the booster's own JSON model (split features, thresholds,
children, default directions, leaf values, per-tree target) into arrays and walks them in a
numba-compiled loop, following XGBoost's rules: go left when `x < threshold` (float32), take the
default direction on a missing value, sum leaf values per target onto the base score.
`tests/unit/test_latency_model.py` checks the outputs equal XGBoost's on random inputs.
"""

from __future__ import annotations

import json

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _walk(x, feature, threshold, left, right, default_left, roots, tree_target, out):
    for t in range(roots.shape[0]):
        root = roots[t]
        target = tree_target[t]
        for i in range(x.shape[0]):
            node = root
            while left[node] != -1:
                v = x[i, feature[node]]
                if np.isnan(v):
                    node = left[node] if default_left[node] else right[node]
                elif v < threshold[node]:
                    node = left[node]
                else:
                    node = right[node]
            out[i, target] += threshold[node]


class CompiledModel:
    def __init__(self, feature, threshold, left, right, default_left, roots, tree_target, base_score):
        self.feature, self.threshold, self.left, self.right = feature, threshold, left, right
        self.default_left, self.roots, self.tree_target = default_left, roots, tree_target
        self.base_score = base_score
        self.num_trees = int(len(roots))
        # Each target's trees alone (targets are independent sums), for a caller that needs one head.
        self._roots_of = {int(t): roots[tree_target == t] for t in np.unique(tree_target)}

    @classmethod
    def from_booster(cls, booster) -> CompiledModel:
        model = json.loads(booster.save_raw("json"))
        learner = model["learner"]
        gbtree = learner["gradient_booster"]["model"]
        num_targets = int(learner["learner_model_param"].get("num_target", "1"))
        base = learner["learner_model_param"]["base_score"]
        base_score = np.atleast_1d(np.asarray(json.loads(base) if base.startswith("[") else float(base),
                                              dtype=np.float32))
        if base_score.size == 1 and num_targets > 1:
            base_score = np.repeat(base_score, num_targets)
        feature, threshold, left, right, default_left, roots = [], [], [], [], [], []
        offset = 0
        for tree in gbtree["trees"]:
            n = len(tree["left_children"])
            lc = np.asarray(tree["left_children"], dtype=np.int64)
            rc = np.asarray(tree["right_children"], dtype=np.int64)
            left.append(np.where(lc == -1, -1, lc + offset))
            right.append(np.where(rc == -1, -1, rc + offset))
            feature.append(np.asarray(tree["split_indices"], dtype=np.int64))
            # For a leaf, split_conditions holds its value (XGBoost's JSON model format).
            threshold.append(np.asarray(tree["split_conditions"], dtype=np.float32))
            default_left.append(np.asarray(tree["default_left"], dtype=np.bool_))
            roots.append(offset)
            offset += n
        tree_info = np.asarray(gbtree["tree_info"], dtype=np.int64)
        return cls(np.concatenate(feature), np.concatenate(threshold), np.concatenate(left),
                   np.concatenate(right), np.concatenate(default_left), np.asarray(roots, dtype=np.int64),
                   tree_info, base_score)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(n, num_targets) raw outputs, as `booster.inplace_predict(x)`."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros((x.shape[0], self.base_score.size), dtype=np.float32)
        _walk(x, self.feature, self.threshold, self.left, self.right, self.default_left, self.roots,
              self.tree_target, out)
        out += self.base_score
        return out

    def predict_target(self, x: np.ndarray, target: int) -> np.ndarray:
        """(n,) raw outputs of one target: `predict(x)[:, target]`, equal to the last bit (the same
        trees summed in the same order), walking only that target's trees."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        roots = self._roots_of.get(target, np.empty(0, dtype=np.int64))
        out = np.zeros((x.shape[0], 1), dtype=np.float32)
        _walk(x, self.feature, self.threshold, self.left, self.right, self.default_left, roots,
              np.zeros(len(roots), dtype=np.int64), out)
        return out[:, 0] + self.base_score[target]
