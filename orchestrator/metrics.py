"""Every Prometheus metric Colocate exports, named once.

Ray exports a `ray.util.metrics` metric called `name` as `ray_<name>` on each node's metrics
port. The controller and the replicas create their metrics from these specs, and the Grafana
dashboard in manifests/ is checked against them, so a panel cannot name a metric that nothing
exports.
"""

from __future__ import annotations

from typing import NamedTuple


class MetricSpec(NamedTuple):
    name: str
    kind: str  # "gauge" | "counter"
    description: str
    tag_keys: tuple[str, ...] = ()


_REPLICA = ("replica",)

CONTROLLER_ROW_METRICS: tuple[MetricSpec, ...] = tuple(
    MetricSpec(f"colocate_{name}", "gauge", desc, _REPLICA) for name, desc in [
        ("online_requests", "Online requests running or waiting in the engine"),
        ("offline_budget_seqs", "Offline sequences allowed at the current online load"),
        ("offline_budget_tokens", "Offline tokens per step allowed at the current online load"),
        ("offline_running", "Offline sequences in the engine (running or paused)"),
        ("observed_ttft_p99_ms", "Observed online p99 time to first token"),
        ("observed_tpot_p99_ms", "Observed online p99 time per output token"),
        ("predicted_step_ms", "Predicted step latency of the current batch (the head its budget was chosen with)"),
        ("throttle_scale", "Share of the model budget granted (1 = open)"),
        ("model_calibration", "Observed / predicted step latency on recent steps"),
        ("slo_ttft_p99_ms", "TTFT p99 target"),
        ("slo_tpot_p99_ms", "TPOT p99 target"),
        ("headroom", "Share of the TPOT target kept free of predicted step time (measured or set)"),
        ("probe_tpot", "Multiplier of the per-step target beyond the model in rows with chat (>= 1)"),
        ("probe_ttft", "Multiplier of the idle row's per-step target beyond the model (>= 1)"),
    ]
)
"""Per replica, from the controller's status row of the same key (without the prefix)."""

MODEL_METRICS: tuple[MetricSpec, ...] = tuple(
    MetricSpec(f"colocate_model_{name}", "gauge", desc) for name, desc in [
        ("age_s", "Seconds since the latency model in force was fit"),
        ("live_mape", "Median-head error of the model in force on steps seen after its fit"),
        ("live_steps", "Live engine steps the model was fit on"),
        ("speed_vs_prior", "Observed / prior-predicted step latency (this host's speed vs the prior's)"),
    ]
)

CONTROLLER_DECISIONS = MetricSpec("colocate_controller_decisions", "counter", "Controller decisions made")

REPLICA_CONTROLLER_CONNECTED = MetricSpec(
    "colocate_replica_controller_connected", "gauge",
    "1 while the replica's last report reached the controller; 0 while it runs without one "
    "(on its fallback budget, or unlimited when co-location control is off)", _REPLICA)

ALL_METRICS: tuple[MetricSpec, ...] = (
    *CONTROLLER_ROW_METRICS, *MODEL_METRICS, CONTROLLER_DECISIONS, REPLICA_CONTROLLER_CONNECTED)


def exported_name(spec: MetricSpec) -> str:
    """The name Prometheus scrapes (Ray prefixes `ray_`; a counter gains `_total`)."""
    return f"ray_{spec.name}" + ("_total" if spec.kind == "counter" else "")


def make_metric(spec: MetricSpec):
    """The `ray.util.metrics` object for a spec (in the process that records it)."""
    from ray.util.metrics import Counter, Gauge

    cls = Gauge if spec.kind == "gauge" else Counter
    return cls(spec.name, description=spec.description, tag_keys=spec.tag_keys)
