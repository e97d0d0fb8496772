"""Lifecycle of the Ray cluster and the Serve application behind `colocate up/down/status`.

A local cluster is started as `ray start --head --block` in a process group of its own, so that
`down` can stop exactly what `up` started (never `ray stop`, which would stop every cluster on the
machine). What `up` did is written to a state file that `down` and `status` read.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import ClusterConfig, ColocateConfig
from orchestrator.names import ENV_STATE_DIR, LLM_DEPLOYMENT_PREFIX, NAMESPACE

# Local clusters are single-user and loopback-only; token auth would make every CLI call
# (including `ray job submit`) carry a token for no gain. Only for those: a cluster joined by
# address keeps whatever auth it has (see `client_env`).
CLUSTER_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def client_env(address: str) -> dict[str, str]:
    """What a client of the cluster at `address` sets before connecting: auth switched off only
    for a cluster on this host's loopback (the kind `colocate up` starts); a remote cluster's
    token auth stays on (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH as Ray reads them)."""
    from orchestrator.serving.auth import is_loopback_host

    host = address.removeprefix("ray://").rsplit(":", 1)[0] if ":" in address else address
    if address == "auto" or not is_loopback_host(host):
        return {"RAY_USAGE_STATS_ENABLED": "0"}
    return dict(CLUSTER_ENV)


def state_dir() -> Path:
    return Path(os.environ.get(ENV_STATE_DIR, ".colocate")).resolve()


@dataclass
class StackState:
    """What `colocate up` created; read back by `down` and `status`."""

    address: str
    dashboard_url: str | None
    endpoint: str
    app_name: str
    started_cluster: bool
    ray_start_pid: int | None = None
    temp_dir: str | None = None
    created_temp_dir: bool = False
    """`up` made `temp_dir` (so `down` removes it, logs included, unless told to keep it)."""
    metrics_url: str | None = None
    """Prometheus endpoint of the head node's metrics agent (Colocate's metrics included)."""
    grpc_endpoint: str | None = None
    """host:port of the gRPC chat service (`serve.grpc`), None when it is not enabled."""

    @classmethod
    def path(cls) -> Path:
        return state_dir() / "stack.json"

    def save(self) -> None:
        p = self.path()
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(p)

    @classmethod
    def load(cls) -> StackState | None:
        p = cls.path()
        if not p.exists():
            return None
        return cls(**json.loads(p.read_text()))

    @classmethod
    def clear(cls) -> None:
        cls.path().unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(count: int, avoid: tuple[int, ...] = ()) -> list[int]:
    """`count` distinct free ports, none of them in `avoid`. The sockets stay bound until all are
    chosen: one `free_port()` after another may return the same port twice (the first socket is
    closed before the next bind), and `ray start` refuses two components on one port (a test
    stack once failed on the dashboard agent and the runtime-env agent both given 41327)."""
    sockets: list[socket.socket] = []
    try:
        ports: list[int] = []
        while len(ports) < count:
            s = socket.socket()
            sockets.append(s)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in avoid and port not in ports:
                ports.append(port)
        return ports
    finally:
        for s in sockets:
            s.close()


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def _ray_executable() -> str:
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else "ray"


def ray_start_command(cfg: ClusterConfig, temp_dir: str, metrics_port: int) -> list[str]:
    """`ray start --head --block` for a local cluster: the GCS on `node_ip`, the dashboard and
    job API on `dashboard_host` (loopback unless configured), every other port free."""
    agent_port, agent_grpc_port, runtime_env_port, client_port = free_ports(
        4, avoid=(cfg.gcs_port, cfg.dashboard_port, metrics_port))
    cmd = [
        _ray_executable(), "start", "--head", "--block",
        f"--port={cfg.gcs_port}",
        f"--node-ip-address={cfg.node_ip}",
        f"--num-cpus={cfg.num_cpus}",
        "--num-gpus=0" if not _has_gpu() else "",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=true",
        f"--dashboard-host={cfg.dashboard_host}",
        f"--dashboard-port={cfg.dashboard_port}",
        # Every port Ray would otherwise take at a fixed default is chosen free, so clusters of
        # other users on the same machine are never disturbed.
        f"--dashboard-agent-listen-port={agent_port}",
        f"--dashboard-agent-grpc-port={agent_grpc_port}",
        f"--metrics-export-port={metrics_port}",
        f"--runtime-env-agent-port={runtime_env_port}",
        f"--ray-client-server-port={client_port}",
        f"--object-store-memory={cfg.object_store_memory_bytes}",
        "--disable-usage-stats",
    ]
    return [c for c in cmd if c]


def start_local_cluster(cfg: ClusterConfig, timeout_s: float = 90.0) -> StackState:
    """Start `ray start --head --block` on loopback with our own ports and temp dir."""
    for name, port in (("cluster.gcs_port", cfg.gcs_port), ("cluster.dashboard_port", cfg.dashboard_port)):
        if port_in_use(cfg.node_ip, port):
            raise RuntimeError(f"{name} {port} is already in use on {cfg.node_ip}; choose another port")
    temp_dir = cfg.temp_dir or f"/tmp/colocate-{cfg.gcs_port}"
    created_temp_dir = not Path(temp_dir).exists()
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    metrics_port = free_port()
    cmd = ray_start_command(cfg, temp_dir, metrics_port)
    log = open(Path(temp_dir) / "colocate-ray-start.log", "ab")
    # Job entrypoints (`python -m jobs.batch`) run with the head node's PATH: make it ours.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, **CLUSTER_ENV, "PATH": path}
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True, env=env,
    )
    dashboard_host = "127.0.0.1" if cfg.dashboard_host in ("0.0.0.0", "::") else cfg.dashboard_host
    dashboard_url = f"http://{dashboard_host}:{cfg.dashboard_port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"ray start exited with code {proc.returncode}; see {temp_dir}/colocate-ray-start.log"
            )
        if _http_ok(f"{dashboard_url}/api/version"):
            break
        time.sleep(0.5)
    else:
        _kill_group(proc.pid)
        raise TimeoutError(f"local Ray cluster not up after {timeout_s:.0f}s; see {temp_dir}")
    return StackState(
        address=f"{cfg.node_ip}:{cfg.gcs_port}",
        dashboard_url=dashboard_url,
        endpoint="",
        app_name="",
        started_cluster=True,
        ray_start_pid=proc.pid,
        temp_dir=temp_dir,
        created_temp_dir=created_temp_dir,
        metrics_url=f"http://{cfg.node_ip}:{metrics_port}/metrics",
    )


def _has_gpu() -> bool:
    return Path("/dev/nvidia0").exists()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def _kill_group(pid: int, grace_s: float = 12.0) -> list[str]:
    """Stop the `ray start` process led by `pid` and every process it spawned (ours alone).

    Ray's workers are started by the raylet in sessions of their own, so a process-group signal
    misses them; the process tree is collected and sent SIGTERM, collected again every half second
    while they stop (a replica started meanwhile goes too), then SIGKILL after `grace_s`.
    Measured on a stack here: the raylet, workers and engines exit within ~11 s of SIGTERM, while
    `ray start --block`, the GCS and Serve's controller and proxy actors were all still there at
    30 s, so a longer grace only delays the SIGKILL that ends them.

    Returns the shared-memory segments those processes mapped and left behind (now removed):
    vLLM unlinks its own only on a clean shutdown (engine.shm).
    """
    import psutil

    from orchestrator.engine import shm

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    known: dict[int, psutil.Process] = {}
    segments: set[str] = set()

    def adopt() -> None:
        """Every descendant of what we know, and what it maps: while the raylet lives, Serve's
        controller may have it start a replica in place of one that is stopping, and that
        process (and its engine channel) must go too."""
        for proc in [root, *list(known.values())]:
            try:
                found = [proc, *proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for child in found:
                if child.pid not in known:
                    known[child.pid] = child
                    segments.update(shm.mapped_segments([child.pid]))
                    try:
                        child.terminate()
                    except psutil.NoSuchProcess:
                        pass

    adopt()
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _wait_gone(list(known.values()), 0.5):
        adopt()
    adopt()
    for proc in _wait_gone(list(known.values()), 0.0):
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    still = _wait_gone(list(known.values()), 5.0)
    if still:
        return []  # something survived SIGKILL: leave what it may still map
    return shm.unlink_segments(segments | shm.created_by(known))


def _wait_gone(procs, timeout_s: float):
    """Wait until every process has exited; a zombie counts as exited (its parent may be gone)."""
    import psutil

    def running(proc) -> bool:
        try:
            return proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout_s
    alive = [p for p in procs if running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if running(p)]
    return alive


def connect(address: str) -> None:
    import ray

    for k, v in client_env(address).items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        if address in ("auto", ray.get_runtime_context().gcs_address):
            return
        ray.shutdown()  # connected elsewhere (say, a local instance a library started)
    ray.init(address=address, namespace=NAMESPACE, logging_level="WARNING", log_to_driver=False)


def deploy(config: ColocateConfig, model_source: str) -> None:
    import logging

    from ray import serve

    from orchestrator.compat.ray_api import serve_run_nonblocking
    from orchestrator.serving.app import build_app, grpc_options

    # Serve logs every deployment option at INFO on the driver; `up` reports progress itself.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": config.serve.host, "port": config.serve.port},
                grpc_options=grpc_options(config))
    # Returns once the deploy is submitted; wait_until_healthy then waits with a timeout and
    # progress, which serve.run cannot give.
    serve_run_nonblocking(build_app(config, model_source), name=config.serve.app_name, route_prefix="/")


def wait_until_healthy(
    config: ColocateConfig, on_progress: Callable[[str], None] = lambda _: None
) -> float:
    """Wait for the application to be RUNNING and /v1/models to answer; returns seconds waited."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    start = time.monotonic()
    last = ""
    while True:
        elapsed = time.monotonic() - start
        if elapsed > config.serve.health_timeout_s:
            raise TimeoutError(f"application not healthy after {elapsed:.0f}s (last status: {last})")
        app = serve.status().applications.get(config.serve.app_name)
        status = app.status.value if app else "NOT_STARTED"
        if app and status == ApplicationStatus.DEPLOY_FAILED.value:
            raise RuntimeError(f"deploy failed: {app.message}")
        http_ok = status == ApplicationStatus.RUNNING.value and _http_ok(f"{config.endpoint}/models")
        if http_ok and _grpc_listening(config):
            return elapsed
        line = f"{status}: " + ", ".join(
            f"{name} {dict(d.replica_states)}" for name, d in (app.deployments.items() if app else [])
        )
        if http_ok:  # Serve started before without gRPC keeps its proxy options (serve.start warns)
            line += f"; waiting for Serve's gRPC proxy on port {config.serve.grpc.port}"
        if line != last:
            on_progress(f"[{elapsed:5.0f}s] {line}")
            last = line
        time.sleep(1.0)


def grpc_endpoint(config: ColocateConfig) -> str | None:
    """host:port clients of the gRPC chat service connect to; None when it is not enabled."""
    grpc = config.serve.grpc
    return f"{grpc.host}:{grpc.port}" if grpc.enabled else None


def _grpc_listening(config: ColocateConfig) -> bool:
    """Serve's gRPC proxy accepts connections (true when gRPC is not enabled). It listens on
    every interface; a wildcard host is probed on loopback."""
    grpc = config.serve.grpc
    if not grpc.enabled:
        return True
    host = "127.0.0.1" if grpc.host in ("0.0.0.0", "::", "") else grpc.host
    return port_in_use(host, grpc.port)


def teardown(state: StackState, keep_logs: bool = False) -> list[str]:
    """Remove what `up` created: the cluster it started (or its application and controller on a
    cluster it joined), the engines' shared memory, and the temp dir it made (unless
    `keep_logs`). Returns what was done, for the CLI to print."""
    from orchestrator.engine import shm

    done = []
    if state.started_cluster and state.ray_start_pid:
        segments = _kill_group(state.ray_start_pid)
        done.append(f"stopped the local Ray cluster (process group {state.ray_start_pid})")
        if segments:
            done.append(f"removed {len(segments)} shared-memory segment(s) its engines left")
        if state.temp_dir and state.created_temp_dir:
            if keep_logs:
                done.append(f"kept its temp dir and logs: {state.temp_dir}")
            else:
                shutil.rmtree(state.temp_dir, ignore_errors=True)
                done.append(f"removed its temp dir {state.temp_dir} (`down --keep-logs` keeps it)")
    else:
        from ray import serve

        connect(state.address)
        serve.delete(state.app_name)
        done.append(f"deleted application {state.app_name!r} from {state.address}")
        from orchestrator.control.controller import kill_controller

        if kill_controller():
            done.append("stopped the controller")
    from orchestrator.engine.channel import sweep_stale_channels

    if removed := sweep_stale_channels():
        done.append(f"removed {len(removed)} engine channel file(s) of stopped replicas")
    if removed := shm.sweep(wait_s=15.0):
        done.append(f"removed {len(removed)} shared-memory segment(s) of stopped engines")
    StackState.clear()
    return done


def replica_rows(app_name: str, address: str) -> list[dict[str, Any]]:
    """One row per LLM replica: actor state joined with the replica's own load report."""
    import ray
    from ray.util.state import list_actors

    from orchestrator.serving.registry import get_or_create_registry

    reports = {r["replica_id"]: r for r in ray.get(get_or_create_registry().snapshot.remote())}
    rows = []
    # An explicit address: other users' clusters on the same machine make auto-detection fail.
    for actor in list_actors(address=address, filters=[("ray_namespace", "=", "serve")], limit=1000):
        name = actor.name or ""
        # SERVE_REPLICA::<app>#<deployment>#<replica id>
        if not name.startswith(f"SERVE_REPLICA::{app_name}#{LLM_DEPLOYMENT_PREFIX}"):
            continue
        replica_id = name.rsplit("#", 1)[-1]
        report = reports.get(replica_id, {})
        if actor.state != "ALIVE":
            state = actor.state
        else:
            state = "RUNNING" if report else "STARTING"
        rows.append({"replica_id": replica_id, "state": state, **{k: v for k, v in report.items() if k != "replica_id"}})
    return rows


class StackError(RuntimeError):
    """`bring_up` could not bring the stack up; whatever it started has been removed."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def bring_up(config: ColocateConfig, on_progress: Callable[[str], None] = lambda _: None) -> StackState:
    """Start or join a cluster, deploy the app, wait until healthy, record the state."""
    from orchestrator.serving.app import ingress_kwargs, resolve_model_source

    existing = StackState.load()
    if existing is not None:
        raise StackError(f"a stack is already up ({existing.endpoint} on {existing.address}); "
                         "run `colocate down` first")
    try:
        model_source = resolve_model_source(config)
    except (FileNotFoundError, ValueError) as err:
        raise StackError(str(err), exit_code=2) from None
    try:
        ingress_kwargs(config)  # API keys (serve.auth, serve.grpc) are read now, before anything starts
    except ValueError as err:
        raise StackError(str(err), exit_code=2) from None
    grpc = config.serve.grpc
    if grpc.enabled and not config.cluster.address and port_in_use("127.0.0.1", grpc.port):
        raise StackError(f"serve.grpc.port {grpc.port} is already in use; choose another port", exit_code=2)
    if config.cluster.address:
        state = StackState(address=config.cluster.address, dashboard_url=None, endpoint="",
                           app_name="", started_cluster=False)
        on_progress(f"joining Ray cluster at {config.cluster.address}")
    else:
        on_progress(f"starting a local Ray cluster on {config.cluster.node_ip}:{config.cluster.gcs_port} "
                    f"({config.cluster.num_cpus} logical CPUs)")
        try:
            state = start_local_cluster(config.cluster)
        except (RuntimeError, TimeoutError) as err:
            raise StackError(str(err)) from None
    state.endpoint, state.app_name = config.endpoint, config.serve.app_name
    state.grpc_endpoint = grpc_endpoint(config)
    state.save()
    try:
        connect(state.address)
        if config.controller.enabled:
            from orchestrator.control.controller import start_controller

            on_progress(f"starting the controller (SLO file {config.controller.slo_path}, "
                        f"period {config.controller.period_s * 1000:.0f} ms)")
            start_controller(config)
        on_progress(f"deploying {config.replicas.num_replicas} replica(s) of {config.model.id} from {model_source}")
        deploy(config, model_source)
        waited_s = wait_until_healthy(config, on_progress=on_progress)
    except BaseException as err:
        on_progress(f"error: {err}; removing what was started")
        teardown(state)
        raise StackError(str(err)) from None
    on_progress(f"healthy after {waited_s:.0f}s")
    if state.grpc_endpoint:
        on_progress(f"gRPC chat service (colocate.v1.ChatService): {state.grpc_endpoint}")
    if state.dashboard_url:
        on_progress(f"Ray dashboard and job API: {state.dashboard_url}")
    return state
