"""`serve deploy` on a two-node Ray cluster on loopback: the controller comes with the application.

A head (`ray start --head`) and a worker (`ray start --address`, with a resource of its own) on
this machine; the application is deployed with Serve's own CLI (`serve deploy`), so it is built
in Serve's controller on the head, not by `colocate up`. What must hold: the builder starts the
Colocate controller, on the head; the replica runs on the worker and its reports reach the
controller (its budget comes from it); `colocate slo set --address` changes the file the
controller reads; chat and a batch job (`ray job submit`) are served; a replica whose controller
is gone says so; stopping both nodes leaves no shared memory and no temp dir behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import openai
import pytest
import yaml

from orchestrator.cluster import lifecycle
from orchestrator.config import ClusterConfig
from orchestrator.serving.auth import key_digest
from tests.integration.conftest import MODEL_CACHE, ROOT, assert_nothing_left, colocate_cmd, shm_segments
from tests.integration.test_batch_jobs import RAY, records, write_input

pytestmark = pytest.mark.integration

WORKER_RESOURCE = "colocate_test_worker"
CHAT_KEY, BATCH_KEY = "chat-key-for-tests", "batch-key-for-tests"
SERVE = str(Path(RAY).parent / "serve")


def _completed(ray) -> dict[str, int]:
    """Requests the replica has completed, per class (its registry report)."""
    from orchestrator.serving.registry import get_or_create_registry

    (report,) = ray.get(get_or_create_registry().snapshot.remote())
    return report["num_completed"]


def wait_for(predicate, timeout_s: float, period_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(period_s)
    return predicate()


def start_worker(head_address: str, log: Path) -> subprocess.Popen:
    """`ray start --address` a second node with its own CPUs and a resource only it has."""
    free = lifecycle.free_port
    cmd = [RAY, "start", "--block", f"--address={head_address}", "--node-ip-address=127.0.0.1",
           "--num-cpus=4", f"--resources={json.dumps({WORKER_RESOURCE: 4})}",
           f"--dashboard-agent-listen-port={free()}", f"--dashboard-agent-grpc-port={free()}",
           f"--metrics-export-port={free()}", f"--runtime-env-agent-port={free()}",
           "--object-store-memory=100000000", "--disable-usage-stats"]
    env = {**os.environ, **lifecycle.CLUSTER_ENV,
           "PATH": f"{Path(RAY).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=env)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    work = tmp_path_factory.mktemp("two-nodes")
    shm_before = shm_segments()
    gcs_port, dash_port = lifecycle.free_ports(2)
    temp_dir = f"/tmp/colocate-test-{gcs_port}"
    head = lifecycle.start_local_cluster(ClusterConfig(gcs_port=gcs_port, dashboard_port=dash_port, num_cpus=4,
                                                       temp_dir=temp_dir))
    worker = None
    try:
        worker = start_worker(head.address, work / "worker.log")
        lifecycle.connect(head.address)
        import ray

        assert wait_for(lambda: sum(n["Alive"] for n in ray.nodes()) == 2, timeout_s=60), ray.nodes()
        yield {"work": work, "head": head, "dashboard_url": head.dashboard_url}
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if worker is not None:
            lifecycle._kill_group(worker.pid)
        lifecycle.teardown(head)
    assert_nothing_left(shm_before, temp_dir)


def deploy(two_nodes) -> dict:
    """Write a ColocateConfig and a Serve config next to each other and `serve deploy` them."""
    work = two_nodes["work"]
    (work / "slo.yaml").write_text((ROOT / "manifests" / "slo.yaml").read_text())
    keys = {"keys": [{"name": "chat", "key_sha256": key_digest(CHAT_KEY), "classes": ["online"]},
                     {"name": "batch", "key_sha256": key_digest(BATCH_KEY), "classes": ["offline"]}]}
    (work / "keys.yaml").write_text(yaml.safe_dump(keys))
    port = lifecycle.free_port()
    colocate = {
        "model": {"id": "colocate-tiny", "source": str(MODEL_CACHE), "build_tiny": "test"},
        "replicas": {"num_replicas": 1, "resources": {WORKER_RESOURCE: 1},
                     "engine_kwargs": {"max_model_len": 2048, "max_num_seqs": 32}},
        # Relative: resolved against base_dir by the builder, which runs in Serve's controller.
        "controller": {"slo_path": "slo.yaml"},
        "serve": {"auth": {"keys_file": "keys.yaml"}},
    }
    (work / "colocate.yaml").write_text(yaml.safe_dump(colocate))
    serve_config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": "colocate", "route_prefix": "/",
                          "import_path": "orchestrator.serving.app:build_from_args",
                          "args": {"config_path": "colocate.yaml", "base_dir": str(work)}}],
    }
    (work / "serve.yaml").write_text(yaml.safe_dump(serve_config))
    env = {**os.environ, **lifecycle.CLUSTER_ENV}
    out = subprocess.run([SERVE, "deploy", str(work / "serve.yaml"), "-a", two_nodes["dashboard_url"]],
                         cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    endpoint = f"http://127.0.0.1:{port}/v1"
    assert wait_for(lambda: _answers(f"{endpoint}/models"), timeout_s=480, period_s=2), \
        subprocess.run([SERVE, "status", "-a", two_nodes["dashboard_url"]], capture_output=True, text=True,
                       env=env).stdout
    return {"endpoint": endpoint, "slo_path": work / "slo.yaml", "env": env}


def _answers(url: str) -> bool:
    """The application serves: a one-token chat reply to a caller with a key. (The model list
    alone is the ingress's answer, given while the replica's engine may still be starting, and
    then its reports are a minute away on a loaded host.)"""
    import urllib.request

    body = json.dumps({"model": "colocate-tiny", "max_tokens": 1,
                       "messages": [{"role": "user", "content": "ready?"}]}).encode()
    request = urllib.request.Request(url.removesuffix("/models") + "/chat/completions", data=body,
                                     headers={"Authorization": f"Bearer {CHAT_KEY}",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_serve_deploy_on_two_nodes_brings_its_controller_and_follows_the_slo_file(two_nodes, tmp_path):
    import ray
    from ray.util.state import list_actors

    from orchestrator.control.controller import get_controller
    from orchestrator.names import CONTROLLER_NAME, LLM_DEPLOYMENT_PREFIX
    from orchestrator.serving.registry import get_or_create_registry

    app = deploy(two_nodes)
    address = two_nodes["head"].address
    lifecycle.connect(address)
    nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    (worker_id,) = [nid for nid, n in nodes.items() if WORKER_RESOURCE in n["Resources"]]
    (head_id,) = [nid for nid in nodes if nid != worker_id]

    # Placement: the controller (started by the Serve builder, not by `colocate up`) on the head,
    # the replica on the worker.
    def alive():
        actors = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000)
        controllers = [a for a in actors if a.name == CONTROLLER_NAME]
        replicas = [a for a in actors if (a.name or "").startswith("SERVE_REPLICA::colocate#" + LLM_DEPLOYMENT_PREFIX)]
        return (controllers, replicas) if controllers and replicas else None
    (controller,), (replica,) = wait_for(alive, timeout_s=60)
    assert controller.node_id == head_id and replica.node_id == worker_id

    # The replica's reports reach the controller, which decides its budget.
    def connected_report():
        reports = ray.get(get_or_create_registry().snapshot.remote())
        return reports and all(r.get("controller") == "connected" for r in reports) and reports
    assert wait_for(connected_report, timeout_s=120), ray.get(get_or_create_registry().snapshot.remote())
    status = wait_for(lambda: (s := ray.get(get_controller().status.remote())) and s["replicas"] and s, timeout_s=30)
    assert status["slo_path"] == str(app["slo_path"])  # base_dir resolved the relative path

    # API keys (serve.auth, a keys file resolved against base_dir): none or a wrong one is a 401,
    # a batch key claiming chat a 403, each OpenAI-shaped, and the server keeps serving.
    hello = {"model": "colocate-tiny", "max_tokens": 8, "messages": [{"role": "user", "content": "hello"}]}
    for key in ("unused", "wrong"):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=app["endpoint"], api_key=key, max_retries=0).chat.completions.create(**hello)
    batch_client = openai.OpenAI(base_url=app["endpoint"], api_key=BATCH_KEY, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError, match="may not send request_class 'online'"):
        batch_client.chat.completions.create(**hello, extra_body={"request_class": "online"})

    # Chat and a batch job, through the real clients, each with its key.
    client = openai.OpenAI(base_url=app["endpoint"], api_key=CHAT_KEY, max_retries=0)
    reply = client.chat.completions.create(**hello)
    assert reply.choices[0].message.content is not None
    completed_before = _completed(ray)
    batch_client.chat.completions.create(**hello)  # no class claimed: the batch key's, offline
    assert wait_for(lambda: _completed(ray)["offline"] == completed_before["offline"] + 1, timeout_s=10)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_input(inp, 12, max_tokens=16)
    job = subprocess.run([RAY, "job", "submit", "--address", two_nodes["dashboard_url"], "--working-dir", str(ROOT),
                          "--runtime-env-json", json.dumps({"env_vars": {"COLOCATE_API_KEY": BATCH_KEY}}),
                          "--", "python", "-m", "jobs.batch", "--input", str(inp), "--output", str(out),
                          "--endpoint", app["endpoint"]], cwd=ROOT, env=app["env"], capture_output=True,
                         text=True, timeout=600)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert sorted(r["custom_id"] for r in records(out)) == ids
    assert all(r["response"]["status_code"] == 200 for r in records(out))

    # `colocate slo set --address` edits the file the controller reads, and it is in force at once.
    cli_env = {**app["env"], "COLOCATE_STATE_DIR": str(tmp_path / "no-state")}
    changed = subprocess.run(colocate_cmd("slo", "set", "--address", address, "colocate-tiny.tpot_p99_ms=321"),
                             cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=120)
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert str(app["slo_path"]) in changed.stdout and "-> 321.0" in changed.stdout
    assert "tpot_p99_ms: 321.0" in app["slo_path"].read_text()
    assert ray.get(get_controller().status.remote())["slo"]["tpot_p99_ms"] == 321.0
    bad = subprocess.run(colocate_cmd("slo", "set", "--address", address, "colocate-tiny.tpot_p99_ms=-5"),
                         cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "tpot_p99_ms" in bad.stderr
    assert "tpot_p99_ms: 321.0" in app["slo_path"].read_text()  # the file is untouched

    # Without its controller a replica says so (registry report, hence `colocate status`).
    ray.kill(get_controller(), no_restart=True)

    def missing():
        reports = ray.get(get_or_create_registry().snapshot.remote())
        return reports and all(r.get("controller") in ("missing", "unreachable") for r in reports)
    assert wait_for(missing, timeout_s=30)
