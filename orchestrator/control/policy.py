"""The controller's decision: a pure function from a snapshot to per-replica offline budgets.

`decide(snapshot, state, model, config)` returns a `Decision`: for every replica an
`OfflineBudget` (tables by online request count, which the replica's engine applies at every
step) plus the policy state the controller must hand back next time. No I/O, no clock: the
snapshot carries `now_s`.

How a replica's budget is chosen:

1. **Per-step target.** The interference profile's per-step latency budget if there is one,
   else the TPOT p99 target (a decode step yields one token per request, so a step longer than
   the TPOT target breaks it), times (1 - headroom).
2. **Model.** For k online requests (with the replica's current online context), the largest
   number of offline decode sequences whose predicted step latency (median head against a TPOT
   target; p99 head against a profiled step p99 and in the idle row) stays under the target
   with room left for a minimal offline prefill chunk (`min_offline_chunk_tokens`: offline
   requests must prefill to make progress) where that costs at most half the sequences
   (`chunk_min_seq_share`; always in the idle row), then the largest chunk that fits beside them. With
   no chat in the engine (k = 0) the step only delays the next chat request's first token, so
   it may take `idle_step_share_of_ttft` of the TTFT target instead: idle capacity is what
   co-location is for; and at least `min_idle_offline_seqs` there whatever the model says, so
   offline work keeps making progress and the calibration keeps seeing offline steps. All
   candidates go to the latency model in one vectorized call, scaled by the replica's
   calibration (the median observed/predicted ratio over its recent steps: the model is
   profiled on a bare engine, the replica serves). Without a model: `PolicyConfig.default_*`,
   a conservative flat budget.
3. **Feedback, with hysteresis.** The observed online p99 TTFT/TPOT (what clients saw) as a
   fraction of the SLO target (the model already bounds every step; this corrects what it
   misses: prefill interruptions, serving overhead, a model that is off): at or above
   `shrink_at` the replica's scale is cut at once (halved; with `full_cut_at` set, halved only
   from there and below it graded, by `grow_below / pressure`), and again only on new
   evidence: a pressure `recut_margin` higher, or still over `shrink_at` after `shrink_hold_s`
   (two observation windows: the requests that saw the old budget must leave the window before
   the cut can be judged); below `grow_below` for `grow_hold_s` (again a window, so each step is
   observed before the next) it grows back, undoing a cut per step up to the level the
   episode's first cut set (`fast_recovery`), then by `grow_step`; in between it grows only every
   `band_grow_hold_s`. The scale multiplies the budget after the slot and operator caps, so a
   cut acts on what runs. The band between the two thresholds is what keeps a steady load from
   oscillating; for the same reason the calibration is smoothed across ticks and a replica's
   tables are held while its calibrated target stays within `target_hysteresis` of theirs.
4. **Slots.** Offline work never holds more than (1 - `online_slot_share`) of the engine's
   sequence slots, so arriving chat finds a free slot instead of preempting a paused request.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from latency_model.features import featurize
from orchestrator.config import PolicyConfig
from orchestrator.control.snapshot import (
    Decision,
    LatencyModel,
    ReplicaDecision,
    ReplicaLoad,
    ReplicaState,
    SloTargets,
    Snapshot,
)
from orchestrator.engine.budget import TABLE_SIZE, OfflineBudget

__all__ = ["Decision", "LatencyModel", "PolicyConfig", "ReplicaDecision", "ReplicaLoad", "ReplicaState",
           "SloTargets", "Snapshot", "decide", "model_tables", "calibration_factor", "offline_slots"]


def _candidate_columns(num_online: np.ndarray, online_ctx: np.ndarray, num_offline: np.ndarray,
                       offline_ctx: np.ndarray, chunk: np.ndarray) -> dict[str, np.ndarray]:
    """Step aggregates for candidate batches: k online decodes, s offline decodes, one offline
    prefill chunk (starting at context 0)."""
    decode_ctx = num_online * online_ctx + num_offline * offline_ctx
    return {
        "num_prefill_tokens": chunk,
        "num_prefill_reqs": (chunk > 0).astype(np.float64),
        "prefill_context_tokens": np.zeros_like(chunk),
        "prefill_attention_tokens2": chunk * (chunk / 2.0),
        "num_decode_reqs": num_online + num_offline,
        "decode_context_tokens": decode_ctx,
        "max_decode_context_tokens": np.where(num_online + num_offline > 0,
                                              np.maximum(np.where(num_online > 0, online_ctx, 0),
                                                         np.where(num_offline > 0, offline_ctx, 0)), 0),
    }


CONTEXT_STEPS_PER_OCTAVE = 8


def context_bucket(tokens: float) -> float:
    """`tokens` rounded up to a lattice of CONTEXT_STEPS_PER_OCTAVE values per doubling (at most
    9% more context than measured: the conservative side). Replicas whose contexts fall in one
    bucket share one candidate grid, and a grid's prediction is reused across ticks while the
    model stays the same (`GridCache`): at 256 replicas a tick costs milliseconds, not seconds."""
    return float(context_buckets(np.array([tokens], dtype=np.float64))[0])


def context_buckets(tokens: np.ndarray) -> np.ndarray:
    """`context_bucket` of every element."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lattice = 2.0 ** (np.ceil(np.log2(tokens) * CONTEXT_STEPS_PER_OCTAVE - 1e-9) / CONTEXT_STEPS_PER_OCTAVE)
    return np.where(tokens <= 1.0, np.maximum(tokens, 0.0), lattice)


def _contexts(load: ReplicaLoad, cfg: PolicyConfig) -> tuple[float, float]:
    """Mean context of the replica's online and offline requests (a default where it has none),
    on the context lattice."""
    online, offline = _all_contexts([load], cfg)[0]
    return float(online), float(offline)


def _all_contexts(loads: list[ReplicaLoad] | tuple[ReplicaLoad, ...], cfg: PolicyConfig) -> np.ndarray:
    """(len(loads), 2): `_contexts` of every replica."""
    raw = np.array([(load.num_online, load.online_context_tokens, load.num_offline_running,
                     load.offline_context_tokens) for load in loads], dtype=np.float64).reshape(-1, 4)
    default = float(cfg.default_online_context_tokens)
    with np.errstate(divide="ignore", invalid="ignore"):
        online = np.where(raw[:, 0] > 0, raw[:, 1] / raw[:, 0], default)
        offline = np.where(raw[:, 2] > 0, raw[:, 3] / raw[:, 2], default)
    return context_buckets(np.stack([online, offline], axis=1))


class Envelopes(NamedTuple):
    """A candidate grid's predictions as the table arithmetic reads them, for n grids: each
    candidate's prediction in the head it is held to (the p99 head in the idle row, else the
    median head, or the p99 head for a step-p99 target), as running maxima. The leading run of
    candidates under a target along an axis is the count of running maxima under it, so a
    replica's tables cost comparisons over (k, seqs) and (k, chunks), not over the whole grid."""

    decode: np.ndarray
    """(n, k, seqs): running max along seqs of the decode-only candidates (chunk 0)."""
    with_chunk: np.ndarray
    """(n, k, seqs): running max along seqs of the largest prediction over chunks up to the
    minimal offline chunk (NaN where no chunk candidate reaches it: never fits)."""
    chunks: np.ndarray
    """(n, k, seqs, chunks): running max along chunks."""


def envelopes(p50: np.ndarray, p99: np.ndarray, cfg: PolicyConfig, tail: bool = False) -> Envelopes:
    """`Envelopes` of (n, grid) median- and p99-head predictions of candidate grids."""
    shape = (p50.shape[0], cfg.table_size, len(cfg.seq_candidates), len(cfg.chunk_candidates))
    held = (p99 if tail else p50).reshape(shape).copy()
    held[:, 0] = p99.reshape(shape)[:, 0]
    min_chunk = int(np.searchsorted(np.asarray(cfg.chunk_candidates), cfg.min_offline_chunk_tokens))
    decode = np.maximum.accumulate(held[..., 0], axis=2)
    if min_chunk < shape[3]:
        with_chunk = np.maximum.accumulate(held[..., :min_chunk + 1].max(axis=3), axis=2)
    else:
        with_chunk = np.full(decode.shape, np.nan, dtype=held.dtype)
    return Envelopes(decode, with_chunk, np.maximum.accumulate(held, axis=3))


class RowMemo:
    """Predictions (both heads) of step rows, remembering the last call's: a replica's recent
    steps are a sliding window and its current batch changes by a request or two, so most rows
    were asked a tick ago. Rows are looked up by a fingerprint (their dot product with fixed
    random weights) in the last call's rows, kept sorted by it, and reused only where every
    column matches. The kept rows are updated by a merge (the rows found again, already in
    order, and the few new ones sorted), not a sort of all of them: a tick's 12,000 calibration
    rows at 256 replicas."""

    def __init__(self) -> None:
        self.fingerprints = self.p50 = self.p99 = np.empty(0)
        self.rows = np.empty((0, 0))
        self._weights: np.ndarray | None = None

    def predict(self, model, rows: np.ndarray, columns: tuple[str, ...],
                p50_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(p50, p99) of `rows` (n, columns); with `p50_only`, p99 is NaN where the model can
        answer the median alone (`predict_p50_ms`; a memo keeps one kind of call)."""
        if not len(rows):
            return np.empty(0), np.empty(0)
        if self._weights is None or len(self._weights) != rows.shape[1]:
            self._weights = np.random.default_rng(12345).uniform(0.5, 1.5, rows.shape[1]) * np.pi
        fingerprints = rows @ self._weights
        p50, p99 = np.full(len(rows), np.nan), np.full(len(rows), np.nan)
        hit = np.zeros(len(rows), dtype=bool)
        at = np.zeros(len(rows), dtype=np.int64)
        if len(self.fingerprints) and self.rows.shape[1] == rows.shape[1]:
            at = np.minimum(np.searchsorted(self.fingerprints, fingerprints), len(self.fingerprints) - 1)
            hit = self.fingerprints[at] == fingerprints
            # A fingerprint is a hint: only the same row (every column equal) reuses a prediction.
            hit[hit] = (self.rows[at[hit]] == rows[hit]).all(axis=1)
            p50[hit], p99[hit] = self.p50[at[hit]], self.p99[at[hit]]
        todo = np.flatnonzero(~hit)
        if len(todo):
            features = featurize({c: rows[todo, j] for j, c in enumerate(columns)})
            if p50_only and hasattr(model, "predict_p50_ms"):
                p50[todo] = model.predict_p50_ms(features)
            else:
                p50[todo], p99[todo] = model.predict_ms(features)
        self._keep(at[hit], todo, fingerprints, rows, p50, p99)
        return p50, p99

    def _keep(self, found: np.ndarray, todo: np.ndarray, fingerprints: np.ndarray, rows: np.ndarray,
              p50: np.ndarray, p99: np.ndarray) -> None:
        """Keep this call's rows, sorted by fingerprint: the kept rows found again (each once, in
        their order) merged with the new ones."""
        keep = np.zeros(len(self.fingerprints), dtype=bool)
        keep[found] = True
        order = todo[np.argsort(fingerprints[todo], kind="stable")]
        old_fp = self.fingerprints[keep]
        at = np.searchsorted(old_fp, fingerprints[order])
        self.fingerprints = np.insert(old_fp, at, fingerprints[order])
        self.p50 = np.insert(self.p50[keep], at, p50[order])
        self.p99 = np.insert(self.p99[keep], at, p99[order])
        old_rows = self.rows[keep] if self.rows.shape[1:] == rows.shape[1:] else np.empty((0, rows.shape[1]))
        self.rows = np.insert(old_rows, at, rows[order], axis=0)


class GridCache:
    """Candidate-grid `Envelopes` by (online, offline) context bucket, for one model: a tick asks
    the model only about buckets it has not seen since the model last changed. Memoizes a pure
    function, so `decide` stays one; the controller keeps one across ticks."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.model = None
        self.cfg: PolicyConfig | None = None
        self.tail = False
        self.max_entries = max_entries
        self.index: dict[tuple[float, float], int] = {}
        self.env: Envelopes | None = None
        """Envelopes of the grids in `index` order, in buffers grown by doubling (rows past
        `len(index)` are unused)."""
        self.steps: dict[int, RowMemo] = {}
        """Predictions of the replicas' recent steps (calibration), one memo per calibration
        phase group: a group's replicas are measured together, so its memo meets the rows it
        saw at the group's previous measurement."""
        self.current = RowMemo()
        """Predictions of the replicas' current batches."""

    def _check(self, model, cfg: PolicyConfig | None = None, tail: bool | None = None) -> None:
        if (model is not self.model or len(self.index) >= self.max_entries
                or (cfg is not None and cfg is not self.cfg and cfg != self.cfg)
                or (tail is not None and tail != self.tail)):
            self.model, self.index, self.steps, self.current, self.env = model, {}, {}, RowMemo(), None
            self.cfg = cfg
            self.tail = bool(tail)

    def lookup(self, model, keys: list[tuple[float, float]], cfg: PolicyConfig,
               tail: bool = False) -> tuple[Envelopes, np.ndarray]:
        """The cached envelopes and, for each key, its row in them."""
        self._check(model, cfg, tail)
        missing = [k for k in dict.fromkeys(keys) if k not in self.index]
        if missing:
            ctx = np.asarray(missing, dtype=np.float64)
            p50, p99 = model.predict_ms(featurize(_grids_at(ctx[:, 0], ctx[:, 1], cfg)))
            n = p50.size // len(missing)
            fresh = envelopes(p50.reshape(-1, n).astype(np.float32), p99.reshape(-1, n).astype(np.float32),
                              cfg, tail)
            self._append(fresh, len(missing))
            start = len(self.index)
            for i, key in enumerate(missing):
                self.index[key] = start + i
        rows = np.fromiter((self.index[k] for k in keys), dtype=np.int64, count=len(keys))
        return self.env, rows

    def _append(self, fresh: Envelopes, count: int) -> None:
        used = len(self.index)
        if self.env is None or used + count > len(self.env.decode):
            capacity = max(16, 2 * (used + count))
            grown = Envelopes(*(np.empty((capacity, *a.shape[1:]), dtype=a.dtype) for a in fresh))
            if self.env is not None:
                for old, new in zip(self.env, grown):
                    new[:used] = old[:used]
            self.env = grown
        for buffer, part in zip(self.env, fresh):
            buffer[used:used + count] = part


def candidate_grid(load: ReplicaLoad, cfg: PolicyConfig) -> dict[str, np.ndarray]:
    """Step columns of every candidate batch the policy weighs for this replica: k online decodes
    (k < table_size) beside s offline decodes (seq_candidates) and one offline prefill chunk
    (chunk_candidates), in (k, s, chunk) order."""
    return _grid_at(*_contexts(load, cfg), cfg)


def _grid_at(online_ctx: float, offline_ctx: float, cfg: PolicyConfig) -> dict[str, np.ndarray]:
    return _grids_at(np.array([online_ctx]), np.array([offline_ctx]), cfg)


def _grids_at(online_ctx: np.ndarray, offline_ctx: np.ndarray, cfg: PolicyConfig) -> dict[str, np.ndarray]:
    """Candidate grids at several (online, offline) contexts, one after the other."""
    k = np.arange(cfg.table_size, dtype=np.float64)
    seqs = np.asarray(cfg.seq_candidates, dtype=np.float64)
    chunks = np.asarray(cfg.chunk_candidates, dtype=np.float64)
    kk, ss, cc = (np.tile(a.ravel(), len(online_ctx)) for a in np.meshgrid(k, seqs, chunks, indexing="ij"))
    n = len(kk) // len(online_ctx)
    return _candidate_columns(kk, np.repeat(online_ctx, n), ss, np.repeat(offline_ctx, n), cc)


def calibration_factor(model: LatencyModel, load: ReplicaLoad, cfg: PolicyConfig) -> float:
    """Median of observed / predicted (median head) step latency over the replica's recent steps."""
    steps = load.recent_steps
    if not steps or len(steps.get("step_latency_ms", ())) < cfg.calibration_min_steps:
        return 1.0
    median, _ = model.predict_ms(featurize(steps))
    return _calibration_from(median, np.asarray(steps["step_latency_ms"], dtype=np.float64), cfg)


def _calibration_from(median: np.ndarray, observed: np.ndarray, cfg: PolicyConfig) -> float:
    ok = median > 0
    if ok.sum() < cfg.calibration_min_steps:
        return 1.0
    low, high = cfg.calibration_bounds
    return float(np.clip(np.median(observed[ok] / median[ok]), low, high))


def model_tables(model: LatencyModel, load: ReplicaLoad, target_ms: float,
                 cfg: PolicyConfig, idle_target_ms: float | None = None,
                 calibration: float = 1.0, tail: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """(max offline seqs by k, max offline tokens by k, predicted step of the current batch);
    predictions are multiplied by the replica's `calibration` factor.

    Rows with chat (k >= 1) hold the median head to `target_ms`: a request's TPOT is the mean of
    its decode steps, so one slow step in a hundred does not break a TPOT p99 (holding every
    step's p99 head to the target left a third of the TPOT SLO unused in the bench: TPOT p99
    107 ms against 170). `tail` holds the p99 head there instead, for a target that is itself a
    step p99 (the interference profile's budget). The idle row (k = 0) always holds the p99 head:
    its one step is what the next chat request's first token waits for, and TTFT p99 is a tail.
    Held to the median head instead, it let idle steps grow and two full bench runs missed 99%
    on TTFT p99 (1.3 s against 1.35-1.42 s, static caps 0.6 s)."""
    online_ctx, offline_ctx = _contexts(load, cfg)
    p50, p99 = model.predict_ms(featurize(_grid_at(online_ctx, offline_ctx, cfg)))
    cur50, cur99 = model.predict_ms(featurize(_current_batch(load, cfg)))
    seqs, tokens = tables_from_predictions(
        p50[None], p99[None], np.array([target_ms]), np.array([idle_target_ms or target_ms]),
        np.array([calibration]), cfg, tail)
    return seqs[0], tokens[0], float((cur99 if tail else cur50)[0] * calibration)


def _current_batch(load: ReplicaLoad, cfg: PolicyConfig) -> dict[str, np.ndarray]:
    online_ctx, offline_ctx = _contexts(load, cfg)
    return _candidate_columns(np.array([float(load.num_online)]), np.array([online_ctx]),
                              np.array([float(load.num_offline_running - load.num_offline_paused)]),
                              np.array([offline_ctx]), np.array([0.0]))


def tables_from_predictions(p50: np.ndarray, p99: np.ndarray, target_ms: np.ndarray, idle_target_ms: np.ndarray,
                            calibration: np.ndarray, cfg: PolicyConfig, tail: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`model_tables` for R replicas at once: p50/p99 are (R, grid) predictions of each replica's
    candidate grid, the rest (R,). Returns (max offline seqs, max offline tokens), each (R, table_size)."""
    env = envelopes(p50, p99, cfg, tail)
    return tables_from_envelopes(env, np.arange(p50.shape[0]), target_ms, idle_target_ms, calibration, cfg)


def tables_from_envelopes(env: Envelopes, rows: np.ndarray, target_ms: np.ndarray, idle_target_ms: np.ndarray,
                          calibration: np.ndarray, cfg: PolicyConfig) -> tuple[np.ndarray, np.ndarray]:
    """The tables of R replicas whose candidate grids are `env`'s `rows` (R,), with their
    targets and calibrations (R,)."""
    num = len(rows)
    seqs = np.asarray(cfg.seq_candidates, dtype=np.float64)
    chunks = np.asarray(cfg.chunk_candidates, dtype=np.float64)
    # Predictions scaled by the calibration are compared as targets divided by it (no scaled
    # copy of the grid). With no chat in the engine (k = 0) no TPOT is at stake; a chat request
    # that arrives waits at most one step before its prefill, so that step is bounded by a share
    # of the TTFT target (the envelopes hold the idle row to the p99 head).
    factor = np.asarray(calibration, dtype=np.float64)
    limit = np.empty((num, cfg.table_size))
    limit[:] = (np.asarray(target_ms, dtype=np.float64) / factor)[:, None]
    limit[:, 0] = np.maximum(target_ms, idle_target_ms) / factor
    under = limit[:, :, None]
    # The prediction is not guaranteed monotone; each count is the length of the leading run of
    # candidates that fit (the count of running maxima under the target).
    num_decode_fit = (env.decode[rows] <= under).sum(axis=2)  # (R, k)
    # Offline requests must prefill to make progress: keep room for a minimal chunk beside the
    # decodes where that costs at most `chunk_min_seq_share` of them (else decodes only).
    # A prefix along the sequence axis too: the count of fitting candidates is used as an index
    # below, which is only right if every smaller candidate fits as well (a noisy leaf must not
    # make a row take a batch the model itself puts over the target).
    num_with_chunk = np.minimum(num_decode_fit, (env.with_chunk[rows] <= under).sum(axis=2))

    def num_seqs(index: np.ndarray) -> np.ndarray:
        """Sequence counts of candidate indices (-1, where none fits: 0)."""
        return np.where(index >= 0, seqs[np.maximum(index, 0)], 0)

    k = np.arange(cfg.table_size)
    best_decode_only = num_decode_fit - 1  # -1: not even zero offline decodes fit
    best_with_chunk = num_with_chunk - 1
    seqs_with_chunk, seqs_decode_only = num_seqs(best_with_chunk), num_seqs(best_decode_only)
    # The idle row keeps the chunk at any cost but the last sequence: it is where offline prefills
    # run; a row with chat lasts as long as a chat burst, and its prefills can wait for the next gap.
    keep_chunk = (seqs_with_chunk >= 1) & ((k == 0)[None, :]
                                           | (seqs_with_chunk >= cfg.chunk_min_seq_share * seqs_decode_only))
    best_s = np.where(keep_chunk, best_with_chunk, best_decode_only)
    max_seqs = np.where(keep_chunk, seqs_with_chunk, seqs_decode_only)
    at_best = env.chunks[rows[:, None], k[None, :], np.maximum(best_s, 0)]  # (R, k, chunks)
    num_chunks = (at_best <= under).sum(axis=2)
    max_tokens = np.where(best_s >= 0, max_seqs + chunks[np.maximum(num_chunks - 1, 0)], 0.0)
    # More online work never leaves room for more offline work.
    return np.minimum.accumulate(max_seqs, axis=1).astype(np.float64), np.minimum.accumulate(max_tokens, axis=1)


_THROTTLES = ("open", "throttled", "recovering", "probing")
OPEN, THROTTLED, RECOVERING, PROBING = range(len(_THROTTLES))
_THROTTLE_CODE = {name: code for code, name in enumerate(_THROTTLES)}
_NAN = float("nan")


class States(NamedTuple):
    """The policy state of R replicas as columns, one `ReplicaState` field each (None as NaN,
    `throttle` as its index in `_THROTTLES`): the feedback rules below step every replica at once."""

    scale: np.ndarray
    throttle: np.ndarray
    last_change_s: np.ndarray
    calm_since_s: np.ndarray
    probe_tpot: np.ndarray
    probe_ttft: np.ndarray
    last_probe_s: np.ndarray
    headroom: np.ndarray
    headroom_at_s: np.ndarray
    cut_pressure: np.ndarray
    calibration: np.ndarray
    calibration_at_s: np.ndarray
    held_target_ms: np.ndarray
    held_idle_target_ms: np.ndarray
    recover_to: np.ndarray
    calibration_var: np.ndarray
    calibration_raw: np.ndarray

    @classmethod
    def of(cls, states: list[ReplicaState]) -> States:
        rows = np.array([(s.scale, _THROTTLE_CODE[s.throttle], s.last_change_s,
                          _NAN if s.calm_since_s is None else s.calm_since_s, s.probe_tpot, s.probe_ttft,
                          s.last_probe_s, _NAN if s.headroom is None else s.headroom, s.headroom_at_s,
                          s.cut_pressure, _NAN if s.calibration is None else s.calibration,
                          s.calibration_at_s, _NAN if s.held_target_ms is None else s.held_target_ms,
                          _NAN if s.held_idle_target_ms is None else s.held_idle_target_ms, s.recover_to,
                          s.calibration_var, _NAN if s.calibration_raw is None else s.calibration_raw)
                         for s in states], dtype=np.float64).reshape(-1, len(cls._fields))
        return cls(*rows.T)

    def replica_states(self, prev: list[ReplicaState], prev_columns: States) -> list[ReplicaState]:
        """One `ReplicaState` per replica: `prev`'s own object where nothing changed
        (`prev_columns` are `prev` as columns)."""
        new = np.column_stack(self)
        old = np.column_stack(prev_columns)
        same = ((new == old) | (np.isnan(new) & np.isnan(old))).all(axis=1)
        out = list(prev)
        changed = np.flatnonzero(~same)
        names = self._fields
        for i, row in zip(changed.tolist(), new[changed].tolist()):
            values = dict(zip(names, row))
            values["throttle"] = _THROTTLES[int(row[1])]
            if row[3] != row[3]:  # NaN: not calm
                values["calm_since_s"] = None
            if row[7] != row[7]:  # NaN: not measured yet
                values["headroom"] = None
            for column in (10, 12, 13, 16):  # NaN: not measured (or built) yet
                if row[column] != row[column]:
                    values[names[column]] = None
            # `dataclasses.replace` per replica per tick was a tenth of a tick at 256 replicas;
            # the values are the validated fields' own types (floats, a throttle name, None).
            state = object.__new__(ReplicaState)
            state.__dict__.update(values)
            out[i] = state
        return out


class Signals(NamedTuple):
    """What R replicas' clients and engines showed, as columns (missing as NaN)."""

    tpot_p99_ms: np.ndarray
    ttft_p99_ms: np.ndarray
    step_p50_ms: np.ndarray
    """0 where not measured."""
    kv_cache_usage: np.ndarray

    @classmethod
    def of(cls, loads: list[ReplicaLoad] | tuple[ReplicaLoad, ...]) -> Signals:
        rows = np.array([(_NAN if load.observed_tpot_p99_ms is None else load.observed_tpot_p99_ms,
                          _NAN if load.observed_ttft_p99_ms is None else load.observed_ttft_p99_ms,
                          load.step_p50_ms or 0.0,
                          _NAN if load.kv_cache_usage is None else load.kv_cache_usage) for load in loads],
                        dtype=np.float64).reshape(-1, 4)
        return cls(*rows.T)


_INITIAL_STATE = ReplicaState()


def offline_slots(max_num_seqs: int, cfg: PolicyConfig) -> int:
    """Sequence slots offline work may hold on an engine of `max_num_seqs` slots."""
    return int(_offline_slots(np.array([float(max_num_seqs)]), cfg)[0])


def seq_candidates_to(candidates: tuple[int, ...], slots: int) -> tuple[int, ...]:
    """`candidates` extended past their largest up to `slots`, which ends the list, by the
    ladder of powers of two and their halfway points (96, 128, 192, 256, 384, ...): each step
    at most 1.5x, as fine, relatively, as the defaults below 64."""
    ladder = sorted({m << n for n in range(1, 20) for m in (2, 3)})
    out = list(candidates) + [v for v in ladder if candidates[-1] < v < slots]
    if out[-1] < slots:
        out.append(slots)
    return tuple(out)


def policy_for_engines(cfg: PolicyConfig, max_num_seqs: int | None) -> PolicyConfig:
    """`cfg` with its `seq_candidates` reaching the offline slots of an engine of `max_num_seqs`
    (the largest a replica reported), when they fall short; the caller keeps the operator's own
    candidates out of this. The defaults stop at 64: on an engine of 128 slots (96 offline; the
    emulated A100) the budget sat at 64 at every chat load, and with candidates to 96 a
    decode-heavy batch ran 10-23% more offline output at the same SLO, simulated
    (docs/results/sim-decode-heavy-2026-12-08). vLLM's own default `max_num_seqs` depends on the
    device (128 on CPU, 256, 1024 on an H100 under Ray Serve LLM), so the engines' reports decide,
    not the config."""
    if not max_num_seqs:
        return cfg
    wider = seq_candidates_to(cfg.seq_candidates, offline_slots(max_num_seqs, cfg))
    return cfg if wider == cfg.seq_candidates else cfg.model_copy(update={"seq_candidates": wider})


def _offline_slots(max_num_seqs: np.ndarray, cfg: PolicyConfig) -> np.ndarray:
    """`offline_slots` of every engine (inf where the engine has not reported its slots, 0)."""
    kept = np.maximum(1.0, np.ceil(max_num_seqs * cfg.online_slot_share))
    return np.where(max_num_seqs > 0, np.maximum(1.0, max_num_seqs - kept), np.inf)


def _next_states(prev: States, pressure: np.ndarray, now_s: float, cfg: PolicyConfig) -> States:
    """The feedback scale's step for every replica (module docstring, point 3).

    At or over `shrink_at`: a cut, if the pressure is new evidence: the window still holds the
    requests that caused the last cut (a request stays in it for a window after it ends), so
    within `shrink_hold_s` only a pressure `recut_margin` higher than the one already answered
    cuts again; after
    a growth step (not "throttled") the window was calm, so any pressure is new. A cut
    multiplies the scale and both probes by `shrink_factor` at or over `full_cut_at` (default
    `shrink_at`), below it by `grow_below / pressure` (at least `shrink_factor`). Under
    `grow_below` (calm since `calm_since_s`): a reduced scale grows a step once calm for
    `grow_hold_s` (with `fast_recovery`, below `recover_to` a step undoes a cut). In the band
    between: it grows only every `band_grow_hold_s`."""
    scale, throttle, last_change = prev.scale, prev.throttle, prev.last_change_s
    shrink = pressure >= cfg.shrink_at
    since_cut_s = now_s - last_change
    new_evidence = ((throttle != THROTTLED) | (since_cut_s >= cfg.shrink_hold_s)
                    | ((pressure > prev.cut_pressure * (1.0 + cfg.recut_margin)) & (since_cut_s >= cfg.min_recut_s)))
    cut = shrink & new_evidence
    calm = ~shrink & (pressure < cfg.grow_below)
    band = ~shrink & ~calm
    calm_since = np.where(np.isnan(prev.calm_since_s), now_s, prev.calm_since_s)
    reduced = scale < 1.0
    grow = ((calm & reduced & (now_s - np.maximum(calm_since, last_change) >= cfg.grow_hold_s))
            | (band & reduced & (since_cut_s >= cfg.band_grow_hold_s)))
    additive = scale + cfg.grow_step
    if cfg.fast_recovery:
        # Up to the first cut's level: undo a cut per step (never less than the additive step).
        additive = np.where(scale < prev.recover_to,
                            np.maximum(additive, np.minimum(prev.recover_to, scale / cfg.shrink_factor)), additive)
    grown_scale = np.minimum(1.0, additive)
    # A full cut at or over `full_cut_at`; below it (opt-in), one graded by how far over `grow_below`.
    with np.errstate(divide="ignore"):
        full_at = cfg.shrink_at if cfg.full_cut_at is None else cfg.full_cut_at
        factor = np.where(pressure >= full_at, cfg.shrink_factor,
                          np.clip(cfg.grow_below / np.maximum(pressure, 1e-9), cfg.shrink_factor, 1.0))
    new_scale = np.where(cut, np.maximum(cfg.min_scale, scale * factor), np.where(grow, grown_scale, scale))
    new_throttle = np.where(cut, THROTTLED, np.where(grow, np.where(grown_scale >= 1.0, OPEN, RECOVERING), throttle))
    return prev._replace(
        scale=new_scale, throttle=new_throttle.astype(np.float64),
        last_change_s=np.where(cut | grow, now_s, last_change),
        # Calm: since when (kept while calm); cut or band: not calm.
        calm_since_s=np.where(calm, calm_since, np.nan),
        cut_pressure=np.where(cut, pressure, prev.cut_pressure),
        # The first cut of an episode (not already throttled) sets the level fast recovery returns to.
        recover_to=np.where(cut & (throttle != THROTTLED), np.maximum(cfg.min_scale, scale * factor), prev.recover_to),
        probe_tpot=np.where(cut, np.maximum(1.0, prev.probe_tpot * factor), prev.probe_tpot),
        probe_ttft=np.where(cut, np.maximum(1.0, prev.probe_ttft * factor), prev.probe_ttft),
        last_probe_s=np.where(cut, now_s, prev.last_probe_s))


def _probed(state: States, tpot_pressure: np.ndarray, ttft_pressure: np.ndarray, kv_cache_usage: np.ndarray,
            now_s: float, cfg: PolicyConfig) -> States:
    """Additive increase of the per-step targets beyond the model's while the observed p99s sit
    well under the SLO (multiplicative decrease happens with every cut, in `_next_states`).

    Only a fresh observation grows a probe (NaN pressure: no chat in the recent window, nothing
    to learn from; a probe grown in a lull would meet the next burst at full height), only at
    full scale, not throttled, `probe_hold_s` after the last probe step, and not while the KV
    cache is fuller than `probe_max_kv_usage`. A probe holds while its signal is between
    `probe_below` and `shrink_at`: that band is what keeps a steady load from oscillating."""
    eligible = ((state.scale >= 1.0) & (state.throttle != THROTTLED) & (now_s - state.last_probe_s >= cfg.probe_hold_s)
                & ~(kv_cache_usage > cfg.probe_max_kv_usage))
    with np.errstate(invalid="ignore"):
        grow_tpot, grow_ttft = tpot_pressure < cfg.probe_below, ttft_pressure < cfg.probe_below
    tpot = np.where(grow_tpot, np.minimum(cfg.max_probe, state.probe_tpot + cfg.probe_step), state.probe_tpot)
    ttft = np.where(grow_ttft, np.minimum(cfg.max_probe, state.probe_ttft + cfg.probe_step), state.probe_ttft)
    moved = eligible & ((tpot != state.probe_tpot) | (ttft != state.probe_ttft))
    return state._replace(probe_tpot=np.where(moved, tpot, state.probe_tpot),
                          probe_ttft=np.where(moved, ttft, state.probe_ttft),
                          last_probe_s=np.where(moved, now_s, state.last_probe_s),
                          throttle=np.where(moved, PROBING, state.throttle).astype(np.float64))


def derived_headroom(prev: float | None, load: ReplicaLoad, tpot_slo_ms: float, cfg: PolicyConfig,
                     dt_s: float = math.inf) -> float | None:
    """The share of the TPOT target to keep free of predicted step time, from what is measured.

    A request's TPOT is the mean of the steps it waited through, so its p99 across requests sits
    above a typical chat step by what the model does not see: steps that carry other requests'
    prefills, serving overhead between steps, timing noise. That gap is mostly additive (a chat
    prefill costs the same whatever the decode batch beside it), so the per-step target is the
    SLO less the observed gap: gap = observed TPOT p99 - median latency of the steps that held
    chat (both over the replica's recent window), headroom = gap / SLO, within bounds, smoothed
    with time constant `headroom_smoothing_s` (`dt_s` since the previous measurement). A ratio
    (headroom 1 - step / TPOT p99) assumed the tail grows in proportion to the step and kept a
    third to a half of a tight SLO free on a fast host. None until both are measured (the
    policy uses `default_headroom`)."""
    signals = Signals.of([load])
    value = _derived_headrooms(np.array([_NAN if prev is None else prev]), signals, tpot_slo_ms,
                               np.array([dt_s]), cfg)[0]
    return None if math.isnan(value) else float(value)


def _decays(dt_s: np.ndarray, tau_s: float) -> np.ndarray:
    """exp(-dt / tau) of every elapsed time (negative ones as 0): the share an exponential
    average keeps of its old value. With math.exp, not np.exp: numpy's vectorized exp may differ
    in the last bit, and the budget tables compare targets with predictions at their edges."""
    return np.array([math.exp(-max(0.0, dt) / tau_s) for dt in np.asarray(dt_s, dtype=np.float64).tolist()])


def _derived_headrooms(prev: np.ndarray, signals: Signals, tpot_slo_ms: float, dt_s: np.ndarray,
                       cfg: PolicyConfig) -> np.ndarray:
    """`derived_headroom` of every replica (NaN: not measured yet)."""
    measured_now = ~np.isnan(signals.tpot_p99_ms) & (signals.step_p50_ms > 0)
    low, high = cfg.headroom_bounds
    with np.errstate(invalid="ignore"):
        gap_ms = np.maximum(0.0, signals.tpot_p99_ms - signals.step_p50_ms)
        measured = np.minimum(np.maximum(gap_ms / tpot_slo_ms, low), high)
    smooth = np.flatnonzero(measured_now & ~np.isnan(prev))
    out = np.where(measured_now, measured, prev)
    if len(smooth):
        weight = 1.0 - _decays(dt_s[smooth], cfg.headroom_smoothing_s)
        out[smooth] = (1.0 - weight) * prev[smooth] + weight * measured[smooth]
    return out


def decide(snapshot: Snapshot, state: Mapping[str, ReplicaState], model: LatencyModel | None,
           cfg: PolicyConfig = PolicyConfig(), cache: GridCache | None = None) -> Decision:
    """Every replica's budget and next policy state (see the module docstring). The feedback
    rules step all replicas' states as columns; all replicas' model questions go to the model
    together: one call for their current batches and calibration steps, and one for the
    candidate grids of context buckets `cache` has not seen."""
    slo = snapshot.slo
    step_budget = snapshot.step_budget_ms if snapshot.step_budget_ms is not None else slo.tpot_p99_ms
    tail = snapshot.step_budget_ms is not None
    loads = snapshot.replicas
    num = len(loads)
    now_s = snapshot.now_s
    prev_states = [state.get(load.replica_id, _INITIAL_STATE) for load in loads]
    prev = States.of(prev_states)
    signals = Signals.of(loads)
    measured_now = ~np.isnan(signals.tpot_p99_ms) & (signals.step_p50_ms != 0)
    measured = _derived_headrooms(prev.headroom, signals, slo.tpot_p99_ms, now_s - prev.headroom_at_s, cfg)
    # The headroom in force: the SLO file's override, else the measured one, else the default.
    headroom = (np.full(num, float(slo.headroom)) if slo.headroom is not None
                else np.where(np.isnan(measured), cfg.default_headroom, measured))
    # What clients saw is held against the SLO itself (cut as it approaches it); the headroom is
    # room kept in the per-step prediction. The current batch's prediction is not a signal: the
    # engine applies the table at every step, so a batch over the target is the one step in
    # which chat arrived beside the idle row's offline work, and the next step already runs the
    # smaller row.
    tpot_pressure = signals.tpot_p99_ms / slo.tpot_p99_ms
    ttft_pressure = signals.ttft_p99_ms / slo.ttft_p99_ms
    pressure = np.nan_to_num(np.fmax(tpot_pressure, ttft_pressure), nan=0.0)
    new = _next_states(prev, pressure, now_s, cfg)
    if model is not None:  # without a model the budget is a fixed default: nothing to probe
        new = _probed(new, tpot_pressure, ttft_pressure, signals.kv_cache_usage, now_s, cfg)
    new = new._replace(headroom=measured, headroom_at_s=np.where(measured_now, now_s, prev.headroom_at_s))
    target_ms = step_budget * (1.0 - headroom) * new.probe_tpot
    idle_target = slo.ttft_p99_ms * (1.0 - headroom) * cfg.idle_step_share_of_ttft * new.probe_ttft

    factors = np.ones(num)
    predicted: list[float | None] = [None] * num
    if model is not None and num:
        seqs, tokens, predicted, new = _model_budgets(model, loads, target_ms, idle_target, cfg, tail,
                                                      cache or GridCache(), factors, new, now_s)
        low = seqs[:, 0] < cfg.min_idle_offline_seqs
        seqs[low, 0] = cfg.min_idle_offline_seqs
        tokens[low, 0] = cfg.min_idle_offline_seqs + cfg.min_offline_chunk_tokens
    else:
        seqs = np.full((num, cfg.table_size), cfg.default_offline_seqs, dtype=np.float64)
        tokens = np.full((num, cfg.table_size), cfg.default_offline_tokens, dtype=np.float64)
        seqs[:, 0], tokens[:, 0] = cfg.default_idle_offline_seqs, cfg.default_idle_offline_tokens
    if slo.max_offline_seqs is not None:
        seqs = np.minimum(seqs, slo.max_offline_seqs)
    slots = _offline_slots(np.array([float(load.max_num_seqs or 0) for load in loads]), cfg)
    seqs = np.minimum(seqs, slots[:, None])
    if slo.max_offline_tokens is not None:
        tokens = np.minimum(tokens, slo.max_offline_tokens)
    # The feedback scale acts on what would actually run, after the slot and operator caps: a
    # model that allows 64 sequences on an engine with 24 offline slots made the first cuts
    # (to 32, 16 of the model's 64) change nothing, and the next ones, a window later, take
    # the budget from 24 to 8 and 0 at once (measured: a 0 <-> 24 bang-bang on a fast host).
    seqs = np.floor(seqs * new.scale[:, None])
    tokens = np.floor(tokens * new.scale[:, None])
    # A sequence needs at least one token per step, and tokens without a sequence are no use.
    tokens = np.where(seqs > 0, np.maximum(tokens, seqs), 0)
    size = min(cfg.table_size, TABLE_SIZE)
    budgets, which = _distinct_budgets(seqs[:, :size], tokens[:, :size])
    states = new.replica_states(prev_states, prev)
    out: dict[str, ReplicaDecision] = {}
    for i, (load, target, pressed, factor, room) in enumerate(zip(loads, target_ms.tolist(), pressure.tolist(),
                                                                  factors.tolist(), headroom.tolist())):
        out[load.replica_id] = ReplicaDecision(budgets[which[i]], states[i], target, predicted[i], pressed,
                                               factor, room)
    return Decision(out)


def _distinct_budgets(seqs: np.ndarray, tokens: np.ndarray) -> tuple[list[OfflineBudget], list[int]]:
    """One `OfflineBudget` per distinct (seqs, tokens) table row pair, and each replica's index
    into them: replicas under like loads get like tables (a dict over the rows' bytes; sorting
    the rows with `np.unique(axis=0)` cost a sixth of a tick at 256 replicas)."""
    tables = np.ascontiguousarray(np.concatenate([seqs, tokens], axis=1).astype(np.int64))
    keys = tables.view(np.dtype((np.void, tables.shape[1] * tables.itemsize))).ravel().tolist() if len(tables) else []
    index: dict[bytes, int] = {}
    which = [index.setdefault(key, len(index)) for key in keys]
    _, firsts = np.unique(np.asarray(which, dtype=np.int64), return_index=True)  # first row of each
    size = seqs.shape[1]
    budgets = [OfflineBudget(tuple(row[:size]), tuple(row[size:])) for row in tables[firsts].tolist()]
    return budgets, which


def _model_budgets(model: LatencyModel, loads: tuple[ReplicaLoad, ...], target_ms: np.ndarray,
                   idle_target_ms: np.ndarray, cfg: PolicyConfig, tail: bool, cache: GridCache,
                   factors: np.ndarray, states: States, now_s: float
                   ) -> tuple[np.ndarray, np.ndarray, list[float], States]:
    """The model's tables for every replica (fills `factors` with their smoothed calibrations,
    which the returned states carry)."""
    num = len(loads)
    cache._check(model, cfg, tail)
    contexts = _all_contexts(loads, cfg)
    current = _candidate_columns(np.array([float(load.num_online) for load in loads]), contexts[:, 0],
                                 np.array([float(load.num_offline_running - load.num_offline_paused) for load in loads]),
                                 contexts[:, 1], np.zeros(num))
    columns = tuple(current)
    # The current batch's prediction is shown, not decided on: only the head the budget is
    # chosen with is asked (the median: half the trees of a two-headed model, a tenth of a tick
    # at 256 replicas).
    p50, p99 = cache.current.predict(model, np.column_stack([current[c] for c in columns]), columns,
                                     p50_only=not tail)
    measured = _calibrate(model, loads, columns, cfg, cache, factors, states, now_s)
    states = _smoothed_calibrations(states, factors, measured, now_s, cfg)
    factors[:] = np.where(np.isnan(states.calibration), 1.0, states.calibration)
    band = hysteresis_band(states.calibration_var, cfg)
    held = _held_target(states.held_target_ms, target_ms / factors, band)
    held_idle = _held_target(states.held_idle_target_ms, idle_target_ms / factors, band)
    states = states._replace(held_target_ms=held, held_idle_target_ms=held_idle)
    env, rows = cache.lookup(model, [tuple(c) for c in contexts.tolist()], cfg, tail)
    seqs, tokens = tables_from_envelopes(env, rows, held, held_idle, np.ones(num), cfg)
    predicted = (p99 if tail else p50) * factors
    return seqs, tokens, predicted.tolist(), states


def hysteresis_band(calibration_var: np.ndarray, cfg: PolicyConfig) -> np.ndarray:
    """Each replica's band around its held target: `target_hysteresis`, or wider where the
    replica's calibration is noisier, so that its smoothed value's own wander under a steady
    load does not cross the band.

    The raw measurements (each a median over the replica's recent steps) spread with relative
    variance `calibration_var` (from consecutive measurements, see `_smoothed_calibrations`);
    smoothing them with weight w leaves a wander of sqrt(w / (2 - w)) of that spread (an
    exponential average of independent noise), and the band is `hysteresis_noise_sigmas` of it,
    at most `max_target_hysteresis`. On a quiet host the floor holds; on a noisy one (CI: a 5.2%
    move of the smoothed calibration in 15 s of steady offline load halved the idle row's budget,
    24 -> 12 sequences, on the bench model's flat step curve) the band follows the noise measured
    on that host."""
    wander = np.sqrt(np.maximum(calibration_var, 0.0)) * _wander_factor(cfg)
    return np.clip(cfg.hysteresis_noise_sigmas * wander, cfg.target_hysteresis,
                   max(cfg.target_hysteresis, cfg.max_target_hysteresis))


def _wander_factor(cfg: PolicyConfig) -> float:
    """The smoothed calibration's standard deviation per unit of the raw measurements' (an
    exponential average with weight w of independent noise keeps sqrt(w / (2 - w)) of it), at
    one measurement per `calibration_every_s` (per 250-ms tick, the controller's default
    period, where that is 0)."""
    period_s = cfg.calibration_every_s if cfg.calibration_every_s > 0 else 0.25
    weight = 1.0 if cfg.calibration_smoothing_s <= 0 else 1.0 - math.exp(-period_s / cfg.calibration_smoothing_s)
    return math.sqrt(weight / (2.0 - weight))


def hysteresis_band_of(calibration_var: float, cfg: PolicyConfig) -> float:
    """`hysteresis_band` of one replica, in plain floats (the controller's status rows: a numpy
    call per replica per tick is milliseconds at hundreds of replicas)."""
    wander = math.sqrt(max(calibration_var, 0.0)) * _wander_factor(cfg)
    return min(max(cfg.hysteresis_noise_sigmas * wander, cfg.target_hysteresis),
               max(cfg.target_hysteresis, cfg.max_target_hysteresis))


def _held_target(held_ms: np.ndarray, target_ms: np.ndarray, band: np.ndarray | float) -> np.ndarray:
    """The calibrated target the tables are built for: the one they were last built for while
    the current one stays within `band` of it (relative), else the current one.

    On a step curve nearly flat in the offline batch size the largest batch under the target
    jumps between far-apart candidates (3, 12, 24 sequences) when the target moves by a few
    percent, and calibration and headroom move it by that much from minute to minute with no
    change of load: the budget then churns (each change pauses or resumes offline requests)
    while chat's latency hardly differs. Held, it changes only when the target has moved by more
    than the band; cuts act through the scale, at once, whatever is held."""
    with np.errstate(invalid="ignore"):
        keep = ~np.isnan(held_ms) & (np.abs(target_ms - held_ms) <= band * held_ms)
    return np.where(keep, held_ms, target_ms)


def _smoothed_calibrations(states: States, raw: np.ndarray, measured: np.ndarray, now_s: float,
                           cfg: PolicyConfig) -> States:
    """Each measured replica's calibration smoothed with its previous one (time constant
    `calibration_smoothing_s`, by time since the previous measurement, not by tick); the first
    measurement is taken as it is, unmeasured replicas keep theirs."""
    prev = states.calibration
    first = measured & np.isnan(prev)
    smooth = np.flatnonzero(measured & ~np.isnan(prev))
    out = np.where(first, raw, prev)
    if len(smooth):
        if cfg.calibration_smoothing_s > 0:
            weight = 1.0 - _decays(now_s - states.calibration_at_s[smooth], cfg.calibration_smoothing_s)
        else:
            weight = np.ones(len(smooth))
        out[smooth] = (1.0 - weight) * prev[smooth] + weight * raw[smooth]
    # The noise: half the squared difference of consecutive raw measurements (relative), whose
    # mean is the raw spread's variance whatever the level; a deviation from the lagging smoothed
    # value would count a real change of speed again at every measurement until the smoothing
    # caught up (a jump of the calibration from 1 to 2 saturated the band for minutes). Each
    # sample is also clipped where it alone would saturate the band.
    var = states.calibration_var.copy()
    last = states.calibration_raw
    pairs = np.flatnonzero(measured & ~np.isnan(prev) & ~np.isnan(last))
    if len(pairs) and cfg.calibration_noise_window_s > 0:
        d2 = 0.5 * ((raw[pairs] - last[pairs]) / prev[pairs]) ** 2
        factor = _wander_factor(cfg)
        if cfg.hysteresis_noise_sigmas > 0 and factor > 0:
            d2 = np.minimum(d2, (cfg.max_target_hysteresis / (cfg.hysteresis_noise_sigmas * factor)) ** 2)
        keep = _decays(now_s - states.calibration_at_s[pairs], cfg.calibration_noise_window_s)
        var[pairs] = keep * var[pairs] + (1.0 - keep) * d2
    return states._replace(calibration=out, calibration_var=var, calibration_raw=np.where(measured, raw, last),
                           calibration_at_s=np.where(measured, now_s, states.calibration_at_s))


CALIBRATION_GROUPS = 4
"""Replicas are measured in this many phase groups spread over `calibration_every_s`."""


def calibration_group(replica_id: str) -> int:
    """A replica's calibration phase group: stable across ticks and controller restarts."""
    return zlib.crc32(replica_id.encode()) % CALIBRATION_GROUPS


def _calibration_due(loads: list[ReplicaLoad], groups: list[int], states: States, now_s: float,
                     cfg: PolicyConfig) -> np.ndarray:
    """Which replicas to measure this tick: each one once per `calibration_every_s`, at its
    group's phase of that period (the first time at once). The measurement is smoothed over
    `calibration_smoothing_s`, five periods, so a fresh median every tick adds nothing but
    cost: it was half of a tick at 256 replicas. Groups spread the fleet's measurements over the
    period, so ticks cost alike."""
    num = len(loads)
    if cfg.calibration_every_s <= 0:
        return np.ones(num, dtype=bool)
    every = cfg.calibration_every_s
    phase = np.array(groups, dtype=np.float64) * every / CALIBRATION_GROUPS
    last = states.calibration_at_s
    with np.errstate(invalid="ignore"):
        crossed = np.floor((now_s + phase) / every) > np.floor((last + phase) / every)
    return np.isnan(states.calibration) | ~np.isfinite(last) | crossed


def _calibrate(model: LatencyModel, loads: list[ReplicaLoad], columns: tuple[str, ...], cfg: PolicyConfig,
               cache: GridCache, factors: np.ndarray, states: States, now_s: float) -> np.ndarray:
    """The calibration (median observed / predicted over its recent steps) of every replica due
    for one (`_calibration_due`) into `factors`; only the steps its group's memo has not
    predicted yet go to the model (a replica's recent steps slide by the steps since its last
    measurement). Returns which replicas were measured (due, with enough steps)."""
    measured = np.zeros(len(loads), dtype=bool)
    group_of = [calibration_group(load.replica_id) for load in loads]
    due = _calibration_due(loads, group_of, states, now_s, cfg)
    enough = [i for i, load in enumerate(loads) if due[i] and load.recent_steps
              and len(load.recent_steps.get("step_latency_ms", ())) >= cfg.calibration_min_steps]
    groups: dict[int, list[int]] = {}
    for i in enough:
        groups.setdefault(group_of[i], []).append(i)
    for group, ids in groups.items():
        memo = cache.steps.setdefault(group, RowMemo())
        measured[ids] = _calibrate_group(model, [loads[i] for i in ids], columns, cfg, memo, factors, ids)
    return measured


def _calibrate_group(model: LatencyModel, loads: list[ReplicaLoad], columns: tuple[str, ...], cfg: PolicyConfig,
                     memo: RowMemo, factors: np.ndarray, ids: list[int]) -> np.ndarray:
    """`_calibrate` for the replicas `ids` (the indices of `loads` in `factors`)."""
    recent = [load.recent_steps for load in loads]
    lengths = np.array([len(steps["step_latency_ms"]) for steps in recent])
    # One concatenation of every replica's every column (column by column), then a transpose:
    # a concatenation per column cost a tenth of a tick at 256 replicas.
    named = (*columns, "step_latency_ms")
    table = np.concatenate([steps[c] for c in named for steps in recent]).astype(np.float64, copy=False)
    table = table.reshape(len(named), -1)
    rows, observed = table[:-1].T, table[-1]
    pred, _ = memo.predict(model, rows, columns, p50_only=True)
    ok = pred > 0
    ratio_all = np.where(ok, observed / np.where(ok, pred, 1.0), np.nan)
    # Into a (replicas, steps) matrix padded with NaN (sorted last): one sort for all medians.
    owner = np.repeat(np.arange(len(ids)), lengths)
    position = np.arange(len(rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    ratio = np.full((len(ids), int(lengths.max())), np.nan)
    ratio[owner, position] = ratio_all
    valid = (~np.isnan(ratio)).sum(axis=1)
    ratio.sort(axis=1)
    lower = np.take_along_axis(ratio, np.maximum(valid - 1, 0)[:, None] // 2, axis=1)[:, 0]
    upper = np.take_along_axis(ratio, (valid // 2)[:, None], axis=1)[:, 0]
    enough = valid >= cfg.calibration_min_steps
    low, high = cfg.calibration_bounds
    with np.errstate(invalid="ignore"):
        factors[np.asarray(ids)] = np.where(enough, np.clip((lower + upper) / 2.0, low, high), 1.0)
    return enough
