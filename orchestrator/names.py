"""Names shared across processes, defined once.

A replica, the controller, a batch job and the CLI run in different processes (often on different
nodes) and find each other only by these names: the Ray namespace and named actors, the GCS keys,
and the environment variables through which a replica configures its engine process.
"""

from __future__ import annotations

# --- Ray ------------------------------------------------------------------------------------
NAMESPACE = "colocate"
"""Ray namespace of every named actor and GCS key Colocate creates."""
CONTROLLER_NAME = "colocate-controller"
REGISTRY_NAME = "colocate-registry"
ADMISSION_NAME = "colocate-offline-admission"
CHECKPOINT_KEY = b"colocate/controller/checkpoint"
"""The controller's policy state and last good SLO, in the GCS key-value store."""
LLM_DEPLOYMENT_PREFIX = "ColocateLLMServer:"
"""Ray Serve LLM names each model's deployment "<server class name>:<model id>"."""
MAX_ONGOING_REQUESTS = 256
"""Serve's per-replica cap on requests in flight (both classes), by default
(`replicas.max_ongoing_requests`): beyond it, requests wait at the router in arrival order,
whatever their class."""

# --- environment: replica -> engine process -------------------------------------------------
ENV_ENGINE_CHANNEL = "COLOCATE_ENGINE_CHANNEL"
"""Path of the shared-memory channel between a replica and its engine's scheduler."""
ENV_CONTROLLER_ENABLED = "COLOCATE_CONTROLLER_ENABLED"
ENV_REPORT_PERIOD_S = "COLOCATE_CONTROLLER_REPORT_PERIOD_S"
ENV_FALLBACK_BUDGET = "COLOCATE_FALLBACK_OFFLINE_BUDGET"
"""'<seqs>,<tokens>': the safe budget an engine runs while the controller is silent."""
ENV_MAX_ONGOING_REQUESTS = "COLOCATE_MAX_ONGOING_REQUESTS"
"""Serve's cap on the replica's requests in flight, reported to the controller (admission)."""
ENV_POLL_SLEEP_US = "COLOCATE_ENGINE_POLL_SLEEP_US"
ENV_TELEMETRY_RING_SIZE = "COLOCATE_TELEMETRY_RING_SIZE"
ENV_TELEMETRY_PATH = "COLOCATE_TELEMETRY_PATH"
"""Where an engine exports its step telemetry (Parquet) when it shuts down."""
ENV_ENGINE_STEP_DELAY_MS = "COLOCATE_ENGINE_STEP_DELAY_MS"
"""A fixed delay added to every engine step that runs tokens: emulates a slower host (testing
that control converges on hardware it was not profiled on; see README)."""
ENV_ENGINE_ORDER = "COLOCATE_ENGINE_ORDER"
"""JSON of the config's `order` section: the engine's starvation guard for length-aware ordering."""
EMULATED_EXECUTOR = "orchestrator.engine.emulated.EmulatedExecutor"
"""vLLM executor class (its `distributed_executor_backend`) of the emulated engine."""
ENV_EMULATION = "COLOCATE_ENGINE_EMULATION"
"""JSON of the config's `replicas.emulation` section: the emulated engine's latency model."""
ENV_ALLOW_UNTESTED = "COLOCATE_ALLOW_UNTESTED_VERSIONS"
"""'1': run against vLLM/Ray versions other than the tested ones (at your own risk)."""

# --- environment: CLI and clients -----------------------------------------------------------
ENV_STATE_DIR = "COLOCATE_STATE_DIR"
ENV_ENDPOINT = "COLOCATE_ENDPOINT"
