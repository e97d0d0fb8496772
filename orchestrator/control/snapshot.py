"""What the controller decides on and what it decides, as plain frozen data.

`Snapshot` (the SLO targets and every replica's `ReplicaLoad`, with the time) goes into the pure
`orchestrator.control.policy.decide`; a `Decision` (per replica a budget table and the policy
state to hand back next time) comes out. Nothing here imports Ray or vLLM.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from orchestrator.engine.budget import OfflineBudget


class LatencyModel(Protocol):
    def predict_ms(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class SloTargets:
    ttft_p99_ms: float
    tpot_p99_ms: float
    headroom: float | None = None
    """Share of each target kept free of predicted step time; None: derived from measurements
    (see `policy.derived_headroom`)."""
    max_offline_seqs: int | None = None
    max_offline_tokens: int | None = None


@dataclass(frozen=True)
class ReplicaLoad:
    replica_id: str
    num_online: int = 0
    """Online requests running or waiting in the engine."""
    online_context_tokens: float = 0.0
    """Sum of the context lengths of the online requests decoding in the latest step."""
    num_offline_running: int = 0
    """Offline requests holding KV in the engine, including those paused by the budget."""
    num_offline_paused: int = 0
    num_offline_waiting: int = 0
    offline_context_tokens: float = 0.0
    observed_ttft_p99_ms: float | None = None
    observed_tpot_p99_ms: float | None = None
    step_p99_ms: float | None = None
    step_p50_ms: float | None = None
    """Median latency of the engine steps that held online requests (recent window)."""
    kv_cache_usage: float | None = None
    reported_at_s: float = 0.0
    recent_steps: Mapping[str, Any] | None = None
    """The engine's latest steps as columns (`latency_model.features.INPUT_COLUMNS` and
    `step_latency_ms`): what the model is calibrated against while serving."""
    max_num_seqs: int | None = None
    """The engine's sequence slots (vLLM's max_num_seqs); None until the engine has started."""
    max_ongoing_requests: int | None = None
    """Serve's cap on this replica's requests in flight (`replicas.max_ongoing_requests`)."""


@dataclass(frozen=True)
class Snapshot:
    now_s: float
    slo: SloTargets
    replicas: tuple[ReplicaLoad, ...]
    step_budget_ms: float | None = None
    """From the interference profile; None: derived from the TPOT target."""


@dataclass(frozen=True)
class ReplicaState:
    scale: float = 1.0
    """Share of the model's budget granted, in [min_scale, 1]: cut at once under SLO pressure."""
    throttle: str = "open"
    """open (full budget), throttled (cut since the last calm period), recovering (growing back),
    probing (the per-step targets are raised beyond the model's because chat sits well under the SLO)."""
    last_change_s: float = -math.inf
    calm_since_s: float | None = None
    probe_tpot: float = 1.0
    """Multiplier (>= 1) of the per-step target in rows with chat: grows additively while the
    observed TPOT p99 is well under its SLO, halves with any cut."""
    probe_ttft: float = 1.0
    """The same for the idle row's target, driven by the observed TTFT p99."""
    last_probe_s: float = -math.inf
    headroom: float | None = None
    """Smoothed measured headroom ((TPOT p99 - median chat step) / TPOT SLO); None until measured."""
    headroom_at_s: float = -math.inf
    """When the headroom was last measured (the smoothing is by time, not by tick)."""
    cut_pressure: float = 0.0
    """The pressure the last cut answered: a repeat cut within `shrink_hold_s` needs a higher one."""
    calibration: float | None = None
    """Smoothed observed / predicted step latency; None until measured."""
    calibration_at_s: float = -math.inf
    """When the calibration was last measured."""
    held_target_ms: float | None = None
    """The calibrated per-step target the budget tables were last built for (rows with chat);
    kept while the current one stays within `target_hysteresis` of it. None: none yet."""
    held_idle_target_ms: float | None = None
    """The same for the idle row."""
    recover_to: float = 1.0
    """The scale the first cut of the latest episode set: up to it the scale grows back by
    undoing cuts (`fast_recovery`), beyond it additively."""
    calibration_var: float = 0.0
    """Variance of the raw calibration measurements relative to the calibration (from consecutive
    measurements, averaged over `calibration_noise_window_s`): how noisy this replica's
    calibration is on this host; it widens the band within which the tables are held
    (`PolicyConfig.target_hysteresis`)."""
    calibration_raw: float | None = None
    """The latest raw calibration measurement (the next one is differenced against it); None: none yet."""

    def to_json(self) -> dict[str, Any]:
        return {"scale": self.scale, "throttle": self.throttle,
                "last_change_s": None if math.isinf(self.last_change_s) else self.last_change_s,
                "calm_since_s": self.calm_since_s, "probe_tpot": self.probe_tpot, "probe_ttft": self.probe_ttft,
                "last_probe_s": None if math.isinf(self.last_probe_s) else self.last_probe_s,
                "headroom": self.headroom,
                "headroom_at_s": None if math.isinf(self.headroom_at_s) else self.headroom_at_s,
                "cut_pressure": self.cut_pressure, "calibration": self.calibration,
                "calibration_at_s": None if math.isinf(self.calibration_at_s) else self.calibration_at_s,
                "held_target_ms": self.held_target_ms, "held_idle_target_ms": self.held_idle_target_ms,
                "recover_to": self.recover_to, "calibration_var": self.calibration_var,
                "calibration_raw": self.calibration_raw}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ReplicaState:
        last = d.get("last_change_s")
        probe = d.get("last_probe_s")
        return cls(float(d["scale"]), str(d["throttle"]), -math.inf if last is None else float(last),
                   d.get("calm_since_s"), float(d.get("probe_tpot", 1.0)), float(d.get("probe_ttft", 1.0)),
                   -math.inf if probe is None else float(probe), d.get("headroom"),
                   -math.inf if d.get("headroom_at_s") is None else float(d["headroom_at_s"]),
                   float(d.get("cut_pressure", 0.0)), d.get("calibration"),
                   -math.inf if d.get("calibration_at_s") is None else float(d["calibration_at_s"]),
                   d.get("held_target_ms"), d.get("held_idle_target_ms"), float(d.get("recover_to", 1.0)),
                   float(d.get("calibration_var", 0.0)), d.get("calibration_raw"))


@dataclass(frozen=True)
class ReplicaDecision:
    budget: OfflineBudget
    state: ReplicaState
    target_step_ms: float
    predicted_step_ms: float | None
    """The current batch's predicted step, in the head the budget was chosen with."""
    pressure: float
    """Observed online p99 TTFT and TPOT over their SLO targets, the larger; >= shrink_at throttles."""
    calibration: float = 1.0
    """Observed / predicted step latency on this replica's recent steps (1: uncalibrated)."""
    headroom: float = 0.0
    """The headroom in force: the SLO file's override, else the measured one, else the default."""


@dataclass(frozen=True)
class Decision:
    replicas: dict[str, ReplicaDecision] = field(default_factory=dict)

    @property
    def state(self) -> dict[str, ReplicaState]:
        return {rid: d.state for rid, d in self.replicas.items()}


def replica_load(report: dict[str, Any]) -> ReplicaLoad:
    """The policy's view of a replica's report (`load_snapshot()` of a Serve replica or of a
    simulated one)."""
    return ReplicaLoad(
        replica_id=report["replica_id"],
        num_online=int(report["num_online_running"] + report["num_online_waiting"]),
        online_context_tokens=float(report.get("online_context_tokens") or 0.0),
        num_offline_running=int(report["num_offline_running"] + report["num_offline_paused"]),
        num_offline_paused=int(report["num_offline_paused"]),
        num_offline_waiting=int(report["num_offline_waiting"]),
        offline_context_tokens=float(report.get("offline_context_tokens") or 0.0),
        observed_ttft_p99_ms=report.get("observed_ttft_p99_ms"),
        observed_tpot_p99_ms=report.get("observed_tpot_p99_ms"),
        step_p99_ms=report.get("step_p99_ms"),
        step_p50_ms=report.get("step_p50_ms"),
        kv_cache_usage=report.get("kv_cache_usage"),
        reported_at_s=float(report.get("received_at_s", report["reported_at_s"])),
        recent_steps=report.get("recent_steps"),
        max_num_seqs=int(report["max_num_seqs"]) if report.get("max_num_seqs") else None,
        max_ongoing_requests=int(report["max_ongoing_requests"]) if report.get("max_ongoing_requests") else None,
    )
