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
   `shrink_at` the replica's scale halves at once, and again only on new evidence: a higher
   pressure, or still over `shrink_at` after `shrink_hold_s` (two observation windows: the
   requests that saw the old budget must leave the window before the cut can be judged); below `grow_below` for `grow_hold_s` (again a window, so each step is
   observed before the next) it grows back by `grow_step`; in between it grows only every
   `band_grow_hold_s`. The scale multiplies the budget after the slot and operator caps, so a
   cut always halves what runs. The band between the two thresholds is what keeps a steady
   load from oscillating.
4. **Slots.** Offline work never holds more than (1 - `online_slot_share`) of the engine's
   sequence slots, so arriving chat finds a free slot instead of preempting a paused request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

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


def _contexts(load: ReplicaLoad, cfg: PolicyConfig) -> tuple[float, float]:
    """Mean context of the replica's online and offline requests (a default where it has none)."""
    online_ctx = (load.online_context_tokens / load.num_online if load.num_online > 0
                  else float(cfg.default_online_context_tokens))
    offline_ctx = (load.offline_context_tokens / load.num_offline_running if load.num_offline_running > 0
                   else float(cfg.default_online_context_tokens))
    return online_ctx, offline_ctx


def candidate_grid(load: ReplicaLoad, cfg: PolicyConfig) -> dict[str, np.ndarray]:
    """Step columns of every candidate batch the policy weighs for this replica: k online decodes
    (k < table_size) beside s offline decodes (seq_candidates) and one offline prefill chunk
    (chunk_candidates), in (k, s, chunk) order."""
    online_ctx, offline_ctx = _contexts(load, cfg)
    k = np.arange(cfg.table_size, dtype=np.float64)
    seqs = np.asarray(cfg.seq_candidates, dtype=np.float64)
    chunks = np.asarray(cfg.chunk_candidates, dtype=np.float64)
    kk, ss, cc = np.meshgrid(k, seqs, chunks, indexing="ij")
    return _candidate_columns(kk.ravel(), np.full(kk.size, online_ctx), ss.ravel(),
                              np.full(kk.size, offline_ctx), cc.ravel())


def calibration_factor(model: LatencyModel, load: ReplicaLoad, cfg: PolicyConfig) -> float:
    """Median of observed / predicted (median head) step latency over the replica's recent steps."""
    steps = load.recent_steps
    if not steps or len(steps.get("step_latency_ms", ())) < cfg.calibration_min_steps:
        return 1.0
    median, _ = model.predict_ms(featurize(steps))
    observed = np.asarray(steps["step_latency_ms"], dtype=np.float64)
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
    k = np.arange(cfg.table_size, dtype=np.float64)
    online_ctx, offline_ctx = _contexts(load, cfg)
    seqs = np.asarray(cfg.seq_candidates, dtype=np.float64)
    chunks = np.asarray(cfg.chunk_candidates, dtype=np.float64)
    shape = (cfg.table_size, len(seqs), len(chunks))
    cols = candidate_grid(load, cfg)
    current = _candidate_columns(np.array([float(load.num_online)]), np.array([online_ctx]),
                                 np.array([float(load.num_offline_running - load.num_offline_paused)]),
                                 np.array([offline_ctx]), np.array([0.0]))
    both = {c: np.concatenate([cols[c], current[c]]) for c in cols}
    p50, p99 = model.predict_ms(featurize(both))
    p50, p99 = p50 * calibration, p99 * calibration
    step_ms = p99 if tail else p50
    # With no chat in the engine (k = 0) no TPOT is at stake; a chat request that arrives waits
    # at most one step before its prefill, so that step is bounded by a share of the TTFT target.
    targets = np.full(shape, target_ms)
    targets[0] = max(target_ms, idle_target_ms or target_ms)
    rows_ms = step_ms[:-1].reshape(shape).copy()
    rows_ms[0] = p99[:-1].reshape(shape)[0]
    fits = rows_ms <= targets  # (k, seqs, chunks)
    # The prediction is not guaranteed monotone; take the prefix of candidates that all fit.
    decode_fits = np.logical_and.accumulate(fits[:, :, 0], axis=1)
    # Offline requests must prefill to make progress: keep room for a minimal chunk beside the
    # decodes where that costs at most `chunk_min_seq_share` of them (else decodes only).
    min_chunk = int(np.searchsorted(chunks, cfg.min_offline_chunk_tokens))
    chunk_fits_at = (np.logical_and.accumulate(fits[:, :, :min_chunk + 1], axis=2)[:, :, -1]
                     if min_chunk < len(chunks) else np.zeros_like(decode_fits))
    # A prefix along the sequence axis too: the count of fitting candidates is used as an index
    # below, which is only right if every smaller candidate fits as well (a noisy leaf must not
    # make a row take a batch the model itself puts over the target).
    with_chunk = np.logical_and.accumulate(decode_fits & chunk_fits_at, axis=1)
    def num_seqs(index: np.ndarray) -> np.ndarray:
        """Sequence counts of candidate indices (-1, where none fits: 0)."""
        return np.where(index >= 0, seqs[np.maximum(index, 0)], 0)

    best_decode_only = decode_fits.sum(axis=1) - 1  # -1: not even zero offline decodes fit
    best_with_chunk = with_chunk.sum(axis=1) - 1
    seqs_with_chunk, seqs_decode_only = num_seqs(best_with_chunk), num_seqs(best_decode_only)
    # The idle row keeps the chunk at any cost but the last sequence: it is where offline prefills
    # run; a row with chat lasts as long as a chat burst, and its prefills can wait for the next gap.
    keep_chunk = (seqs_with_chunk >= 1) & ((k == 0) | (seqs_with_chunk >= cfg.chunk_min_seq_share * seqs_decode_only))
    best_s = np.where(keep_chunk, best_with_chunk, best_decode_only)
    max_seqs = np.where(keep_chunk, seqs_with_chunk, seqs_decode_only)
    max_tokens = np.zeros(cfg.table_size)
    for i in range(cfg.table_size):
        if best_s[i] < 0:
            continue
        chunk_fits = np.logical_and.accumulate(fits[i, best_s[i], :])
        max_tokens[i] = max_seqs[i] + chunks[chunk_fits.sum() - 1]
    # More online work never leaves room for more offline work.
    return np.minimum.accumulate(max_seqs), np.minimum.accumulate(max_tokens), float(step_ms[-1])


def offline_slots(max_num_seqs: int, cfg: PolicyConfig) -> int:
    """Sequence slots offline work may hold on an engine of `max_num_seqs` slots."""
    return max(1, max_num_seqs - max(1, math.ceil(max_num_seqs * cfg.online_slot_share)))


def _next_state(prev: ReplicaState, pressure: float, now_s: float, cfg: PolicyConfig) -> ReplicaState:
    if pressure >= cfg.shrink_at:
        # A repeat cut needs new evidence: the window still holds the requests that caused the
        # last cut (a request stays in it for a window after it ends), so within `shrink_hold_s`
        # only a higher pressure than the one already answered cuts again. After a growth step
        # (not "throttled") the window was calm, so any pressure is new.
        since_cut_s = now_s - prev.last_change_s
        new_evidence = (prev.throttle != "throttled" or since_cut_s >= cfg.shrink_hold_s
                        or (pressure > prev.cut_pressure and since_cut_s >= cfg.min_recut_s))
        if new_evidence:
            return replace(prev, scale=max(cfg.min_scale, prev.scale * cfg.shrink_factor), throttle="throttled",
                           last_change_s=now_s, calm_since_s=None, cut_pressure=pressure,
                           probe_tpot=max(1.0, prev.probe_tpot * cfg.shrink_factor),
                           probe_ttft=max(1.0, prev.probe_ttft * cfg.shrink_factor), last_probe_s=now_s)
        return replace(prev, calm_since_s=None)
    if pressure < cfg.grow_below:
        calm_since = prev.calm_since_s if prev.calm_since_s is not None else now_s
        if prev.scale < 1.0 and now_s - max(calm_since, prev.last_change_s) >= cfg.grow_hold_s:
            return _grown(prev, now_s, calm_since, cfg)
        return replace(prev, calm_since_s=calm_since)
    if prev.scale < 1.0 and now_s - prev.last_change_s >= cfg.band_grow_hold_s:
        return _grown(prev, now_s, None, cfg)
    return replace(prev, calm_since_s=None)


def _grown(prev: ReplicaState, now_s: float, calm_since_s: float | None, cfg: PolicyConfig) -> ReplicaState:
    scale = min(1.0, prev.scale + cfg.grow_step)
    return replace(prev, scale=scale, throttle="open" if scale >= 1.0 else "recovering", last_change_s=now_s,
                   calm_since_s=calm_since_s)


def _probed(state: ReplicaState, tpot_pressure: float | None, ttft_pressure: float | None,
            load: ReplicaLoad, now_s: float, cfg: PolicyConfig) -> ReplicaState:
    """Additive increase of the per-step targets beyond the model's while the observed p99s sit
    well under the SLO (multiplicative decrease happens with every cut, in `_next_state`).

    Only a fresh observation grows a probe: with no chat in the recent window there is nothing
    to learn from, and a probe grown in a lull would meet the next burst at full height. A
    probe holds while its signal is between `probe_below` and `shrink_at`: that band is what keeps
    a steady load from oscillating."""
    if state.scale < 1.0 or state.throttle == "throttled" or now_s - state.last_probe_s < cfg.probe_hold_s:
        return state
    if load.kv_cache_usage is not None and load.kv_cache_usage > cfg.probe_max_kv_usage:
        return state
    grow_tpot = tpot_pressure is not None and tpot_pressure < cfg.probe_below
    grow_ttft = ttft_pressure is not None and ttft_pressure < cfg.probe_below
    if not (grow_tpot or grow_ttft):
        return state
    tpot = min(cfg.max_probe, state.probe_tpot + cfg.probe_step) if grow_tpot else state.probe_tpot
    ttft = min(cfg.max_probe, state.probe_ttft + cfg.probe_step) if grow_ttft else state.probe_ttft
    if (tpot, ttft) == (state.probe_tpot, state.probe_ttft):
        return state
    return replace(state, probe_tpot=tpot, probe_ttft=ttft, last_probe_s=now_s, throttle="probing")


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
    if load.observed_tpot_p99_ms is None or not load.step_p50_ms or load.step_p50_ms <= 0:
        return prev
    gap_ms = max(0.0, load.observed_tpot_p99_ms - load.step_p50_ms)
    low, high = cfg.headroom_bounds
    measured = float(np.clip(gap_ms / tpot_slo_ms, low, high))
    if prev is None:
        return measured
    weight = 1.0 - math.exp(-max(0.0, dt_s) / cfg.headroom_smoothing_s)
    return (1.0 - weight) * prev + weight * measured


def decide(snapshot: Snapshot, state: Mapping[str, ReplicaState], model: LatencyModel | None,
           cfg: PolicyConfig = PolicyConfig()) -> Decision:
    slo = snapshot.slo
    step_budget = snapshot.step_budget_ms if snapshot.step_budget_ms is not None else slo.tpot_p99_ms
    out: dict[str, ReplicaDecision] = {}
    for load in snapshot.replicas:
        prev = state.get(load.replica_id, ReplicaState())
        measured = derived_headroom(prev.headroom, load, slo.tpot_p99_ms, cfg, snapshot.now_s - prev.headroom_at_s)
        measured_now = load.observed_tpot_p99_ms is not None and bool(load.step_p50_ms)
        headroom = slo.headroom if slo.headroom is not None else (
            measured if measured is not None else cfg.default_headroom)
        # What clients saw is held against the SLO itself (cut as it approaches it); the
        # headroom is room kept in the per-step prediction. The current batch's prediction is
        # not a signal: the engine applies the table at every step, so a batch over the target
        # is the one step in which chat arrived beside the idle row's offline work, and the next
        # step already runs the smaller row.
        tpot_pressure = (load.observed_tpot_p99_ms / slo.tpot_p99_ms
                         if load.observed_tpot_p99_ms is not None else None)
        ttft_pressure = (load.observed_ttft_p99_ms / slo.ttft_p99_ms
                         if load.observed_ttft_p99_ms is not None else None)
        pressure = max((p for p in (tpot_pressure, ttft_pressure) if p is not None), default=0.0)
        new_state = _next_state(prev, pressure, snapshot.now_s, cfg)
        if model is not None:  # without a model the budget is a fixed default: nothing to probe
            new_state = _probed(new_state, tpot_pressure, ttft_pressure, load, snapshot.now_s, cfg)
        new_state = replace(new_state, headroom=measured,
                            headroom_at_s=snapshot.now_s if measured_now else prev.headroom_at_s)
        target_ms = step_budget * (1.0 - headroom) * new_state.probe_tpot
        predicted, factor = None, 1.0
        if model is not None:
            idle_target = (slo.ttft_p99_ms * (1.0 - headroom) * cfg.idle_step_share_of_ttft
                           * new_state.probe_ttft)
            factor = calibration_factor(model, load, cfg)
            seqs, tokens, predicted = model_tables(
                model, load, target_ms, cfg, idle_target, factor, tail=snapshot.step_budget_ms is not None)
            if seqs[0] < cfg.min_idle_offline_seqs:
                seqs[0] = cfg.min_idle_offline_seqs
                tokens[0] = cfg.min_idle_offline_seqs + cfg.min_offline_chunk_tokens
        else:
            seqs = np.full(cfg.table_size, cfg.default_offline_seqs, dtype=np.float64)
            tokens = np.full(cfg.table_size, cfg.default_offline_tokens, dtype=np.float64)
            seqs[0], tokens[0] = cfg.default_idle_offline_seqs, cfg.default_idle_offline_tokens
        if slo.max_offline_seqs is not None:
            seqs = np.minimum(seqs, slo.max_offline_seqs)
        if load.max_num_seqs:
            seqs = np.minimum(seqs, offline_slots(load.max_num_seqs, cfg))
        if slo.max_offline_tokens is not None:
            tokens = np.minimum(tokens, slo.max_offline_tokens)
        # The feedback scale acts on what would actually run, after the slot and operator caps: a
        # model that allows 64 sequences on an engine with 24 offline slots made the first cuts
        # (to 32, 16 of the model's 64) change nothing, and the next ones, a window later, take
        # the budget from 24 to 8 and 0 at once (measured: a 0 <-> 24 bang-bang on a fast host).
        seqs = np.floor(seqs * new_state.scale)
        tokens = np.floor(tokens * new_state.scale)
        # A sequence needs at least one token per step, and tokens without a sequence are no use.
        tokens = np.where(seqs > 0, np.maximum(tokens, seqs), 0)
        size = min(cfg.table_size, TABLE_SIZE)
        budget = OfflineBudget(tuple(int(v) for v in seqs[:size]), tuple(int(v) for v in tokens[:size]))
        out[load.replica_id] = ReplicaDecision(budget, new_state, target_ms, predicted, pressure, factor, headroom)
    return Decision(out)
