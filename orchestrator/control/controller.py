"""The central controller: a named, restartable Ray actor running observe -> decide -> act -> record.

- observe: the replicas push load snapshots (`report`, every `report_period_s`); the SLO file is
  polled for edits;
- decide: `orchestrator.policy.decide`, a pure function of the snapshot, the policy state and
  the latency model;
- act: each replica gets its budget as the reply to its next report (it writes it into its
  engine's channel); the batch jobs' shared offline concurrency follows the replicas' budgets;
- record: Prometheus metrics (Ray's metrics port), the policy state checkpointed to the GCS, a
  log line for every SLO change and throttle transition.

The actor restarts on failure (`max_restarts=-1`) and restores its policy state, including the
hysteresis, and the last good SLO targets from the checkpoint. While it is away, replicas keep
their last budget until it expires (`silence_timeout_s`) and then fall back to the safe budget.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray

from latency_model.live import LiveModelFitter
from orchestrator.config import PolicyConfig
from orchestrator.control.policy import (
    Decision,
    GridCache,
    ReplicaLoad,
    ReplicaState,
    Snapshot,
    candidate_grid,
    decide,
    hysteresis_band_of,
    policy_for_engines,
)
from orchestrator.control.profile import load_profile
from orchestrator.control.reply import make_reply
from orchestrator.control.sharing import admission_total
from orchestrator.control.snapshot import replica_load
from orchestrator.metrics import CONTROLLER_DECISIONS, CONTROLLER_ROW_METRICS, MODEL_METRICS, make_metric
from orchestrator.names import CHECKPOINT_KEY, CONTROLLER_NAME, NAMESPACE

STALE_REPORT_S = 2.0

log = logging.getLogger(__name__)


class _Metrics:
    def __init__(self) -> None:
        prefix = len("colocate_")
        self.gauges = {spec.name[prefix:]: make_metric(spec) for spec in CONTROLLER_ROW_METRICS}
        self.model_gauges = {spec.name[len("colocate_model_"):]: make_metric(spec) for spec in MODEL_METRICS}
        self.decisions = make_metric(CONTROLLER_DECISIONS)

    def record_model(self, model: dict[str, Any]) -> None:
        for name, gauge in self.model_gauges.items():
            value = model.get(name if name != "live_steps" else "num_live_steps")
            if value is not None:
                gauge.set(float(value))

    def record(self, row: dict[str, Any]) -> None:
        tags = {"replica": row["replica_id"]}
        for name, gauge in self.gauges.items():
            value = row.get(name)
            if value is not None:
                gauge.set(float(value), tags=tags)


def _send_admission_total(total: int, job_policy: str = "weighted") -> None:
    from orchestrator.control.admission import get_or_create_admission

    # Looked up on every change: the admission actor may have been replaced since.
    get_or_create_admission().set_total_budget.remote(total, job_policy)


class GcsCheckpoint:
    """The controller's checkpoint in the cluster's GCS key-value store (survives the actor)."""

    def get(self) -> bytes | None:
        from orchestrator.compat.ray_api import kv_get

        return kv_get(CHECKPOINT_KEY, NAMESPACE)

    def put(self, data: bytes) -> None:
        from orchestrator.compat.ray_api import kv_put

        kv_put(CHECKPOINT_KEY, data, NAMESPACE)


class MemoryCheckpoint:
    """A checkpoint store in this process's memory: a controller that need not survive itself
    (the simulator's)."""

    def __init__(self) -> None:
        self.data: bytes | None = None

    def get(self) -> bytes | None:
        return self.data

    def put(self, data: bytes) -> None:
        self.data = data


class ControllerCore:
    """The controller's logic; `Controller` is this as a Ray actor. The clock and the checkpoint
    store are injected, so unit tests run it without Ray."""

    def __init__(self, *, model_id: str, slo_path: str, period_s: float = 0.25,
                 silence_timeout_s: float = 2.0, model_path: str | None = None,
                 profile_path: str | None = None, policy: dict[str, Any] | None = None,
                 clock: Callable[[], float] = time.time, store=None, metrics: bool = True,
                 admission: Callable[[int], None] | None = None, learn_online: bool = False,
                 job_policy: str = "weighted",
                 refit_period_s: float = 10.0) -> None:
        from orchestrator.control.slo import SloFile, SloWatcher

        self.store = store if store is not None else GcsCheckpoint()
        self._send_admission_total = (admission if admission is not None
                                      else functools.partial(_send_admission_total, job_policy=job_policy))
        self.model_id = model_id
        self.period_s = period_s
        self.silence_timeout_s = silence_timeout_s
        self.clock = clock
        self.policy = PolicyConfig.model_validate(policy or {})
        # The operator's candidates stay as set; left unset, they follow the engines' slots.
        self._candidates_follow_engines = "seq_candidates" not in self.policy.model_fields_set
        self.latency_model = None
        self.notes: list[str] = []
        if model_path:
            from latency_model.model import load

            try:
                self.latency_model = load(model_path)
            except (ValueError, OSError) as err:
                self.notes.append(f"latency model not loaded ({err}); using the conservative default budget")
                log.error("colocate controller: %s", self.notes[-1])
        # The model in force is learned from the replicas' own steps; a shipped or profiled
        # model is only its prior (latency_model.live).
        self.fitter = LiveModelFitter(self.latency_model, clock=clock) if learn_online else None
        self.refit_period_s = refit_period_s
        self._refit_task: asyncio.Task | None = None
        self._live_error: float | None = None
        self._grid_cache = GridCache()  # grid predictions of the model in force, by context bucket
        self.profile = None
        try:
            self.profile = load_profile(profile_path)
        except (ValueError, OSError) as err:
            self.notes.append(f"interference profile not loaded ({err}); per-step budget from the TPOT target")
            log.error("colocate controller: %s", self.notes[-1])
        self._last_checkpoint: bytes | None = None
        checkpoint = self._restore()
        last_good = SloFile.model_validate(checkpoint["slo"]) if checkpoint.get("slo") else None
        self.state: dict[str, ReplicaState] = {
            rid: ReplicaState.from_json(s) for rid, s in checkpoint.get("state", {}).items()}
        self.restored = bool(checkpoint)
        self.slo = SloWatcher(slo_path, {model_id}, last_good=last_good)
        self._poll_slo()
        self.reports: dict[str, dict[str, Any]] = {}
        self.replies: dict[str, tuple[dict[str, Any], float]] = {}  # replica -> (budget, decided at)
        self.last_decision: Decision | None = None
        self.last_decision_s: float | None = None
        self.metrics = _Metrics() if metrics else None
        self._loop_task: asyncio.Task | None = None
        self._admission_total: int | None = None
        self.override: dict[str, Any] | None = checkpoint.get("override")

    # --- checkpoint -----------------------------------------------------------------------

    def _restore(self) -> dict[str, Any]:
        raw = self.store.get()
        return json.loads(raw) if raw else {}

    def _checkpoint(self) -> None:
        data = json.dumps({"state": {rid: s.to_json() for rid, s in self.state.items()}, "override": self.override,
                           "slo": self.slo.current.model_dump(mode="json") if self.slo.current else None}).encode()
        # Written only when it changed: a steady controller does not write to the GCS every tick.
        if data != self._last_checkpoint:
            self.store.put(data)
            self._last_checkpoint = data

    # --- observe --------------------------------------------------------------------------

    def _poll_slo(self) -> None:
        changes, error = self.slo.poll()
        for change in changes:
            log.warning("colocate controller: SLO change %s", change)
        if error:
            log.error("colocate controller: SLO file rejected: %s", error)

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        if self.fitter is not None and (self._refit_task is None or self._refit_task.done()):
            self._refit_task = asyncio.get_running_loop().create_task(self._refit_loop())

    @property
    def model_in_force(self):
        return self.fitter.model if self.fitter is not None else self.latency_model

    async def _refit_loop(self) -> None:
        """Refit the latency model on the live steps every `refit_period_s`, in a worker thread:
        a fit takes seconds and must never delay a tick (XGBoost releases the GIL)."""
        period_s = self.refit_period_s
        while True:
            await asyncio.sleep(period_s)
            period_s = await asyncio.to_thread(self.refit_once, period_s)

    def refit_once(self, period_s: float) -> float:
        """One round of the refit loop (also what the simulator calls on its own clock): measure
        the live error, refit if enough new steps arrived; returns the period until the next."""
        try:
            self._live_error = self.fitter.live_error()
            held_out = self.fitter.report.holdout_mape
            # A fit costs a core for a second or two, on the hosts it serves: once the model
            # describes the host, refit less and less often (up to 12x the period), and at
            # the base period again as soon as its live error grows.
            drifted = (self._live_error is not None and held_out is not None
                       and self._live_error > 2.0 * held_out + 0.05)
            period_s = self.refit_period_s if drifted or held_out is None else min(
                2.0 * period_s, 12.0 * self.refit_period_s)
            if self.fitter.due(min_new_steps=self.fitter.cfg.min_steps // 2):
                report = self.fitter.refit(self._candidate_grid())
                if report is not None:
                    log.warning("colocate controller: latency model refit on %d live steps in %.1f s "
                                "(hold-out MAPE %.1f%%, host speed vs prior %s)", report.num_live_steps,
                                report.fit_s, 100 * (report.holdout_mape or 0),
                                "-" if report.speed_vs_prior is None else f"{report.speed_vs_prior:.2f}x")
        except Exception:  # noqa: BLE001 - a failed fit keeps the model in force
            log.exception("colocate controller: latency model refit failed")
        return period_s

    def _candidate_grid(self) -> dict[str, Any] | None:
        """The batch compositions the policy asks the model about, at the replicas' current
        contexts: where the prior's (rescaled) shape fills in what live steps have not covered."""
        if self.latency_model is None:
            return None
        loads = [replica_load(r) for r in self.reports.values()]
        return candidate_grid(loads[0] if loads else ReplicaLoad("grid"), self.policy)

    async def report(self, snapshot: dict[str, Any]) -> dict[str, Any] | None:
        """A replica's load; the reply is its current offline budget (None: none decided yet)."""
        self._ensure_loop()
        return self.receive(snapshot)

    def receive(self, snapshot: dict[str, Any]) -> dict[str, Any] | None:
        """`report` without the loop start (the simulator calls it on its own clock)."""
        # Freshness is judged on this clock alone: a replica on another node stamps its report
        # with that host's wall clock, and two hosts' clocks need not agree.
        snapshot["received_at_s"] = self.clock()
        if self.fitter is not None:
            self.fitter.add(snapshot.pop("new_steps", None))
        if snapshot.get("recent_steps"):
            # As arrays once per report, not on every tick: at hundreds of replicas the
            # conversion of the steps' lists was a third of a tick.
            snapshot["recent_steps"] = {c: np.asarray(v, dtype=np.float64) for c, v in snapshot["recent_steps"].items()}
        self.reports[snapshot["replica_id"]] = snapshot
        stored = self.replies.get(snapshot["replica_id"])
        if stored is None:
            return None
        budget, decided_at_s = stored
        # The budget's validity runs from when it was decided: if ticks fail or skip this
        # replica, the same budget keeps ageing and the engine falls back on its own.
        return make_reply(budget, decided_at_s=decided_at_s, now_s=self.clock(),
                          silence_timeout_s=self.silence_timeout_s)

    # --- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - one bad tick must not stop the controller
                log.exception("colocate controller: tick failed")
            await asyncio.sleep(max(0.0, self.period_s - (time.monotonic() - started)))

    def tick(self) -> Decision | None:
        # observe
        self._poll_slo()
        now = self.clock()
        fresh = {rid: r for rid, r in self.reports.items() if now - r["received_at_s"] <= STALE_REPORT_S}
        targets = self.slo.targets(self.model_id)
        if targets is None:
            return None  # no valid SLO yet: replicas stay on their safe fallback budget
        snapshot = Snapshot(now_s=now, slo=targets, replicas=tuple(replica_load(r) for r in fresh.values()),
                            step_budget_ms=(self.profile or {}).get("step_budget_ms"))
        # decide
        if self._candidates_follow_engines:
            self.policy = policy_for_engines(self.policy, max((load.max_num_seqs or 0 for load in snapshot.replicas),
                                                              default=0))
        previous = {rid: s for rid, s in self.state.items()}
        decision = decide(snapshot, self.state, self.model_in_force, self.policy, self._grid_cache)
        # act
        for rid, d in decision.replicas.items():
            budget = self.override or {"max_offline_seqs": list(d.budget.max_offline_seqs),
                                       "max_offline_tokens": list(d.budget.max_offline_tokens)}
            self.replies[rid] = (budget, now)
        if self.override is None:
            self.state = {**self.state, **decision.state}
        # Under an override the policy's state stays where it was: what clients see then is the
        # pinned budget's doing, not the policy's, and learning from it is wrong (a bench's chat-
        # alone reference, at budget 0, grew the probe to its 4x ceiling, and the policy then
        # started from there).
        self._set_admission(decision, snapshot)
        # record
        for load in snapshot.replicas:
            d = decision.replicas[load.replica_id]
            before = previous.get(load.replica_id, ReplicaState())
            if d.state.throttle != before.throttle:
                log.warning("colocate controller: replica %s %s -> %s (scale %.3f, pressure %.2f)",
                            load.replica_id, before.throttle, d.state.throttle, d.state.scale, d.pressure)
            if self.metrics is not None:
                self.metrics.record(self._status_row(load, d, targets))
        if self.metrics is not None:
            self.metrics.decisions.inc()
            self.metrics.record_model(self.model_status())
        self.last_decision, self.last_decision_s = decision, now
        self._checkpoint()
        return decision

    def edit_slo(self, assignments: list[str]) -> dict[str, Any]:
        """`colocate slo set` through the controller: the file it reads is edited where it lives
        (its node, the head), validated before it is written, and in force on return. Returns
        {"path", "changes"} or {"path", "error"} (the file is then untouched)."""
        from orchestrator.control.slo import SloError, apply_setting, diff, load_slo, write_slo_atomically

        models = {self.model_id}
        try:
            old = load_slo(self.slo.path, models)
            new = old
            for assignment in assignments:
                new = apply_setting(new, assignment, models)
        except SloError as err:
            return {"path": str(self.slo.path), "error": str(err)}
        write_slo_atomically(self.slo.path, new)
        self._poll_slo()
        return {"path": str(self.slo.path), "changes": diff(old, new) or ["no change"]}

    def slo_text(self) -> dict[str, Any]:
        """The SLO file as the controller's node has it (`colocate slo show`)."""
        try:
            return {"path": str(self.slo.path), "text": self.slo.path.read_text()}
        except OSError as err:
            return {"path": str(self.slo.path), "error": f"cannot read: {err.strerror or err}"}

    def set_override(self, budget: dict[str, Any] | None) -> None:
        """Fix every replica's budget (`max_offline_seqs` / `max_offline_tokens` tables), bypassing
        the policy: static caps for the interference profiler and the benchmark's baselines.
        None returns control to the policy."""
        if budget is not None:
            from orchestrator.engine.budget import OfflineBudget

            OfflineBudget(tuple(budget["max_offline_seqs"]), tuple(budget["max_offline_tokens"]))
            budget = {"max_offline_seqs": list(budget["max_offline_seqs"]),
                      "max_offline_tokens": list(budget["max_offline_tokens"])}
        log.warning("colocate controller: budget override %s -> %s", self.override, budget)
        self.override = budget

    def _set_admission(self, decision: Decision, snapshot: Snapshot) -> None:
        """Batch jobs keep as many offline requests in flight as the replicas can usefully hold
        at no online load (`sharing.offline_slots`): the engines hold the excess over the
        current budget, paused or waiting, at no cost to chat."""
        loads = {load.replica_id: load for load in snapshot.replicas}
        total = admission_total(
            ((d.budget.max_offline_seqs[0], loads[rid].max_num_seqs if rid in loads else None,
              loads[rid].max_ongoing_requests if rid in loads else None) for rid, d in decision.replicas.items()),
            None if self.override is None else self.override["max_offline_seqs"][0])
        if total == self._admission_total:
            return
        try:
            self._send_admission_total(total)
            self._admission_total = total
        except Exception as err:  # noqa: BLE001 - jobs keep their last allowance
            log.warning("colocate controller: could not update the batch admission: %s", err)

    # --- what operators see ---------------------------------------------------------------

    def _status_row(self, load: ReplicaLoad, d, targets) -> dict[str, Any]:
        seqs, tokens = d.budget.at(load.num_online)
        if self.override is not None:
            from orchestrator.engine.budget import OfflineBudget

            seqs, tokens = OfflineBudget(tuple(self.override["max_offline_seqs"]),
                                         tuple(self.override["max_offline_tokens"])).at(load.num_online)
        return {
            "replica_id": load.replica_id,
            "online_requests": load.num_online,
            "offline_running": load.num_offline_running,
            "offline_waiting": load.num_offline_waiting,
            "offline_budget_seqs": seqs,
            "offline_budget_tokens": tokens,
            "observed_ttft_p99_ms": load.observed_ttft_p99_ms,
            "observed_tpot_p99_ms": load.observed_tpot_p99_ms,
            "predicted_step_ms": d.predicted_step_ms,
            "target_step_ms": d.target_step_ms,
            "throttle": "override" if self.override is not None else d.state.throttle,
            "step_p99_ms": load.step_p99_ms,
            "throttle_scale": d.state.scale,
            "model_calibration": d.calibration,
            "target_band": hysteresis_band_of(d.state.calibration_var, self.policy),
            "headroom": d.headroom,
            "budget_seqs_by_online": list(d.budget.max_offline_seqs[:8]),
            "probe_tpot": d.state.probe_tpot,
            "probe_ttft": d.state.probe_ttft,
            "pressure": d.pressure,
            "slo_ttft_p99_ms": targets.ttft_p99_ms,
            "slo_tpot_p99_ms": targets.tpot_p99_ms,
            "kv_cache_usage": load.kv_cache_usage,
        }

    def _status_row_with_counters(self, report: dict[str, Any], d, targets) -> dict[str, Any]:
        row = self._status_row(replica_load(report), d, targets)
        for key in ("num_online_tokens_total", "num_offline_tokens_total", "num_offline_prompt_tokens_total",
                    "num_offline_output_tokens_total", "num_steps_total", "step_time_s_total",
                    "throttle_reactions",
                    "num_offline_preempted_total", "num_throttled_steps", "num_fallback_steps", "reported_at_s",
                    "recent_steps"):
            row[key] = report.get(key)
        if row.get("recent_steps"):
            row["recent_steps"] = {c: np.asarray(v, dtype=np.float64).tolist() for c, v in row["recent_steps"].items()}
        return row

    async def status(self) -> dict[str, Any]:
        self._ensure_loop()
        return self.status_snapshot()

    def status_snapshot(self) -> dict[str, Any]:
        targets = self.slo.targets(self.model_id)
        rows = []
        if self.last_decision is not None and targets is not None:
            now = self.clock()
            for rid, d in self.last_decision.replicas.items():
                report = self.reports.get(rid)
                if report is None or now - report["received_at_s"] > STALE_REPORT_S:
                    continue
                rows.append(self._status_row_with_counters(report, d, targets))
        return {
            "model": self.model_id,
            "slo": targets.__dict__ if targets else None,
            "slo_path": str(self.slo.path),
            "slo_error": self.slo.last_error,
            "latency_model": self.model_in_force is not None,
            "latency_model_status": self.model_status(),
            "step_budget_ms": (self.profile or {}).get("step_budget_ms"),
            "restored_from_checkpoint": self.restored,
            "override": self.override,
            "period_s": self.period_s,
            "last_decision_s": self.last_decision_s,
            "notes": self.notes,
            "replicas": rows,
        }

    def model_status(self) -> dict[str, Any]:
        """The latency model in force: what it was fit on, its age and its live error."""
        if self.fitter is None:
            return {"source": "prior" if self.latency_model is not None else "none", "learn_online": False}
        report = self.fitter.report.to_json()
        fit_at = report.get("fit_at_s")
        return {**report, "learn_online": True, "age_s": None if fit_at is None else self.clock() - fit_at,
                "live_mape": self._live_error, "num_steps_collected": self.fitter.num_steps}

    async def ready(self) -> bool:
        self._ensure_loop()
        return True


Controller = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(ControllerCore)


def start_controller(config, cwd: Path | None = None):
    """Create (or find) the controller for a ColocateConfig; paths resolve against `cwd`.

    It runs on the head node: the SLO file, latency model and profile are read there (a relative
    path in the config means a path on the head), and it survives worker nodes coming and going.
    An existing controller is kept as it is (a redeploy of the application does not reset it;
    `colocate down` stops it)."""
    from orchestrator.compat.ray_api import head_node_resource

    base = cwd or Path.cwd()

    def resolve(p: str | None) -> str | None:
        return None if p is None else str((base / p).resolve())

    c = config.controller
    handle = Controller.options(name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached",
                                get_if_exists=True, resources={head_node_resource(): 0.001}).remote(
        model_id=config.model.id, slo_path=resolve(c.slo_path), period_s=c.period_s,
        silence_timeout_s=c.silence_timeout_s, model_path=resolve(c.model_path),
        profile_path=resolve(c.profile_path), policy=c.policy.model_dump(mode="json", exclude_unset=True),
        learn_online=c.learn_online, refit_period_s=c.refit_period_s, job_policy=config.order.job_policy)
    ray.get(handle.ready.remote(), timeout=60)
    return handle


def get_controller():
    return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)


def kill_controller() -> bool:
    """Stop the controller and forget its checkpoint (a later `up` starts fresh)."""
    from orchestrator.compat.ray_api import kv_del

    try:
        handle = get_controller()
    except ValueError:
        return False
    ray.kill(handle, no_restart=True)
    kv_del(CHECKPOINT_KEY, NAMESPACE)
    return True
