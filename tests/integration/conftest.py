"""A real local Ray cluster with a real vLLM-on-CPU replica, started once per test session.

The stack is brought up through the `colocate` CLI itself, on free loopback ports, with its own
state and temp directories, and torn down with `colocate down`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.cluster.lifecycle import free_ports
from orchestrator.logs import quiet_http_client_logs

quiet_http_client_logs()

ROOT = Path(__file__).resolve().parents[2]
MODEL_CACHE = ROOT / ".colocate" / "models" / "tiny-test"


def colocate_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", *args]


def start_stack(work: Path, *, model: dict, engine_kwargs: dict, controller: dict | None = None,
                serve: dict | None = None, env: dict | None = None, replicas: dict | None = None,
                order: dict | None = None):
    """`colocate up` a stack of one replica on free loopback ports; yields its info, then `down`.
    `serve` adds to the config's serve section (e.g. `grpc`), `replicas` to its replicas section
    (e.g. the emulated engine), `order` is the config's order section, `env` adds to `colocate
    up`'s environment."""
    taken = ((serve or {}).get("grpc") or {}).get("port")
    serve_port, gcs_port, dash_port = free_ports(3, avoid=(taken,) if taken else ())
    slo_path = work / "slo.yaml"
    slo_path.write_text((ROOT / "manifests" / "slo.yaml").read_text())
    config = {
        "model": model,
        "replicas": {"num_replicas": 1, "engine_kwargs": engine_kwargs, **(replicas or {})},
        "serve": {"port": serve_port, "health_timeout_s": 420, **(serve or {})},
        "cluster": {"gcs_port": gcs_port, "dashboard_port": dash_port, "temp_dir": f"/tmp/colocate-test-{gcs_port}"},
        "controller": {"slo_path": str(slo_path), **(controller or {})},
        **({"order": order} if order else {}),
    }
    config_path = work / "colocate.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, **(env or {}), "COLOCATE_STATE_DIR": str(work / "state")}
    shm_before = shm_segments()
    try:
        up = subprocess.run(colocate_cmd("up", "-c", str(config_path)), cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as err:
        # The killed `up` leaves the cluster it started (its own session) behind: stop it.
        subprocess.run(colocate_cmd("down"), cwd=ROOT, env=env, timeout=120)
        pytest.fail(f"colocate up did not finish in {err.timeout:.0f}s:\n{err.stdout or ''}")
    if up.returncode != 0:
        subprocess.run(colocate_cmd("down"), cwd=ROOT, env=env, timeout=120)
        pytest.fail(f"colocate up failed ({up.returncode}):\n{up.stdout}\n{up.stderr[-4000:]}")
    info = {
        "endpoint": f"http://127.0.0.1:{serve_port}/v1",
        "model": model["id"],
        "env": env,
        "config_path": config_path,
        "dashboard_url": f"http://127.0.0.1:{dash_port}",
        "gcs_address": f"127.0.0.1:{gcs_port}",
        "app_name": "colocate",
        "up_stdout": up.stdout,
        "slo_path": slo_path,
    }
    try:
        yield info
    finally:
        _disconnect_from(info["gcs_address"])
        subprocess.run(colocate_cmd("down"), cwd=ROOT, env=env, timeout=120)
    assert_nothing_left(shm_before, config["cluster"]["temp_dir"])


def shm_segments() -> set[str]:
    """POSIX shared memory and named semaphores now on this machine (/dev/shm): vLLM's
    `psm_*` segments, joblib's `sem.loky-*`, our engine channels."""
    shm_dir = Path("/dev/shm")
    return {p.name for p in shm_dir.iterdir()} if shm_dir.is_dir() else set()


def assert_nothing_left(shm_before: set[str], temp_dir: str) -> None:
    """A stopped stack leaves no shared memory and no temp dir behind (issue 14). Segments that
    appeared meanwhile and are still mapped by a live process are another user's."""
    from orchestrator.engine import shm

    leaked = shm_segments() - shm_before
    if leaked:
        import psutil

        live = shm.mapped_segments(p.pid for p in psutil.process_iter())
        leaked -= live
    assert not leaked, f"the stopped stack left shared-memory segments: {sorted(leaked)}"
    assert not Path(temp_dir).exists(), f"the stopped stack left its temp dir {temp_dir}"


def _disconnect_from(gcs_address: str) -> None:
    """Drop this test process's Ray connection to a cluster about to stop (`controller_in_force`
    opens one): a driver whose GCS has gone exits the whole process about a minute later, and it
    took pytest down mid-suite with exit code 1 and no summary."""
    import ray

    # Whatever it is connected to: the address forms need not match (a match test let the
    # connection live on in one run), and the next direct call connects again.
    if ray.is_initialized():
        ray.shutdown()


def controller_in_force(stack) -> dict:
    """The controller's status, asked directly over a Ray connection from the test process: a
    `colocate status` call starts a Ray driver process (10 s and more on a loaded host), so a test
    that times something, or watches a window of a few seconds, must not poll through it."""
    import ray

    from orchestrator.cluster.lifecycle import connect
    from orchestrator.control.controller import get_controller

    connect(stack["gcs_address"])
    return ray.get(get_controller().status.remote(), timeout=30)


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    yield from start_stack(
        tmp_path_factory.mktemp("stack"),
        model={"id": "colocate-tiny", "source": str(MODEL_CACHE), "build_tiny": "test"},
        engine_kwargs={"max_model_len": 2048, "max_num_seqs": 32},
    )
