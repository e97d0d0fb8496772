"""API keys and the request class they allow (orchestrator.serving.auth), and the ingress's ASGI
middleware that applies them, on a bare Starlette app (no Ray cluster)."""

from __future__ import annotations

import json

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from orchestrator.config import AuthConfig, ConfigError, parse_config
from orchestrator.request_class import RequestClass
from orchestrator.serving import ingress
from orchestrator.serving.auth import AuthError, HttpAccess, Refusal, key_digest, new_key_entry, parse_keys

CHAT_KEY, BATCH_KEY = "chat-secret", "batch-secret"
KEYS = f"""
keys:
  - {{name: chat, key_sha256: {key_digest(CHAT_KEY)}, classes: [online]}}
  - {{name: batch, key_env: BATCH_KEY, classes: [offline]}}
  - {{name: both, key_sha256: {key_digest("both-secret")}, classes: [offline, online]}}
"""


def access(tmp_path, **auth) -> HttpAccess:
    (tmp_path / "keys.yaml").write_text(KEYS)
    return HttpAccess.from_config(AuthConfig(keys_file="keys.yaml", **auth), base_dir=tmp_path,
                                  environ={"BATCH_KEY": BATCH_KEY})


def test_keys_file_is_validated_with_the_field_and_reason():
    for text, expected in [
        ("keys: []", "keys: List should have at least 1 item"),
        ("keys: [{name: a, classes: [online]}]", "exactly one of key_sha256 and key_env"),
        ("keys: [{name: a, key_sha256: abc}]", "64 lowercase hex"),
        ("keys: [{name: a, key_env: K, classes: [vip]}]", "keys.0.classes.0"),
        (f"keys: [{{name: a, key_sha256: '{'a' * 64}'}}, {{name: a, key_sha256: '{'b' * 64}'}}]", "unique"),
        ("keys: [{name: a, key_env: UNSET}]", "UNSET is not set"),
        ("{not yaml", "not valid YAML"),
    ]:
        with pytest.raises(AuthError, match=expected.replace("[", r"\[")):
            parse_keys(text, "keys.yaml", environ={})


def test_a_key_is_needed_and_binds_the_request_class(tmp_path):
    a = access(tmp_path)
    with pytest.raises(Refusal) as missing:
        a.authenticate(None, "127.0.0.1")
    assert missing.value.status_code == 401
    for header in ("Bearer wrong", "Basic " + CHAT_KEY, "Bearer "):
        with pytest.raises(Refusal, match="invalid API key|malformed") as bad:
            a.authenticate(header, "127.0.0.1")
        assert bad.value.status_code == 401
    chat = a.authenticate(f"Bearer {CHAT_KEY}", "10.1.2.3")  # with a key, any host
    batch = a.authenticate(f"bearer {BATCH_KEY}", "127.0.0.1")
    assert (chat.name, batch.name) == ("chat", "batch")
    # No class claimed: the key's own; a class the key does not allow: 403.
    assert a.bind_class(batch, {"messages": []})["request_class"] == "offline"
    assert a.bind_class(chat, {"messages": []})["request_class"] == "online"
    with pytest.raises(Refusal, match="'batch' may not send request_class 'online'") as jump:
        a.bind_class(batch, {"request_class": "online"})
    assert jump.value.status_code == 403
    with pytest.raises(Refusal):
        a.bind_class(chat, {"request_class": "offline"})
    both = a.authenticate("Bearer both-secret", None)
    assert a.bind_class(both, {})["request_class"] == "offline"
    assert a.bind_class(both, {"request_class": "online"}) == {"request_class": "online"}
    assert a.bind_class(batch, [1, 2]) == [1, 2]  # not an object: the route answers 400


def test_without_keys_only_loopback_clients_are_served():
    a = HttpAccess()
    assert a.authenticate(None, "127.0.0.1") is None and a.authenticate(None, "::1") is None
    with pytest.raises(Refusal, match="loopback clients only") as remote:
        a.authenticate(None, "192.168.1.7")
    assert remote.value.status_code == 403
    assert HttpAccess(loopback_only=False).authenticate(None, "192.168.1.7") is None
    assert a.bind_class(None, {"x": 1}) == {"x": 1}


def test_access_survives_the_trip_to_the_ingress_as_kwargs(tmp_path):
    a = access(tmp_path)
    again = HttpAccess.from_kwargs(json.loads(json.dumps(a.to_kwargs())))
    assert again == a and CHAT_KEY not in json.dumps(a.to_kwargs())  # digests only


def test_a_remote_bind_needs_keys_or_an_explicit_waiver():
    with pytest.raises(ConfigError, match="serves other hosts"):
        parse_config({"serve": {"host": "0.0.0.0"}}, "x")
    parse_config({"serve": {"host": "0.0.0.0", "auth": {"keys_env": "K"}}}, "x")
    parse_config({"serve": {"host": "0.0.0.0", "auth": {"allow_remote_without_keys": True}}}, "x")


def test_new_key_entry_grants_the_key_it_prints():
    key, entry = new_key_entry("jobs", [RequestClass.OFFLINE])
    (grant,) = parse_keys(entry, "new")
    assert grant.sha256 == key_digest(key) and grant.classes == (RequestClass.OFFLINE,)


@pytest.fixture
def client(tmp_path, monkeypatch):
    async def echo(request: Request):
        raw = await request.body()
        try:
            return JSONResponse({"body": json.loads(raw or b"null")})
        except ValueError:
            return JSONResponse({"raw": raw.decode()})

    app = Starlette(routes=[Route("/v1/chat/completions", echo, methods=["POST"]),
                            Route("/v1/models", echo, methods=["GET"])])
    app.add_middleware(ingress.AccessMiddleware)
    monkeypatch.setattr(ingress, "_http_access", access(tmp_path))
    return TestClient(app)


def test_middleware_answers_openai_style_errors_and_rewrites_the_class(client):
    unauth = client.get("/v1/models")
    assert unauth.status_code == 401 and unauth.json()["error"]["type"] == "AuthenticationError"
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {CHAT_KEY}"}).status_code == 200
    batch = {"Authorization": f"Bearer {BATCH_KEY}"}
    ok = client.post("/v1/chat/completions", headers=batch, json={"messages": [{"role": "user", "content": "é"}]})
    assert ok.status_code == 200 and ok.json()["body"]["request_class"] == "offline"
    denied = client.post("/v1/chat/completions", headers=batch, json={"request_class": "online"})
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "permission_denied"
    # Not JSON: passed on untouched, for the route to answer with a 400.
    raw = client.post("/v1/chat/completions", headers=batch, content=b"{not json")
    assert raw.json() == {"raw": "{not json"}


def test_ray_auth_is_switched_off_only_for_clusters_on_loopback():
    from orchestrator.cluster.lifecycle import client_env

    assert client_env("127.0.0.1:6390")["RAY_AUTH_MODE"] == "disabled"
    assert client_env("localhost:6390")["RAY_AUTH_MODE"] == "disabled"
    for remote in ("10.0.0.5:6379", "ray://head.example:10001", "auto", "head-svc:6379"):
        assert "RAY_AUTH_MODE" not in client_env(remote), remote


def test_a_local_cluster_binds_its_dashboard_and_job_api_to_loopback():
    from orchestrator.cluster.lifecycle import ray_start_command
    from orchestrator.config import ClusterConfig

    cmd = ray_start_command(ClusterConfig(), "/tmp/x", 9999)
    assert "--dashboard-host=127.0.0.1" in cmd and "--node-ip-address=127.0.0.1" in cmd
    assert "--dashboard-host=0.0.0.0" in ray_start_command(ClusterConfig(dashboard_host="0.0.0.0"), "/tmp/x", 1)


def test_every_wildcard_bind_in_the_manifests_is_explained_and_keyed():
    """The GPU manifests listen on every interface (a pod network): each such line says why, and
    the GPU config does not serve them without API keys."""
    from pathlib import Path

    from orchestrator.config import load_config

    root = Path(__file__).resolve().parents[2]
    for manifest in sorted((root / "manifests").glob("*.yaml")):
        lines = manifest.read_text().splitlines()
        for i, line in enumerate(lines):
            if "0.0.0.0" in line and not line.lstrip().startswith("#"):
                explained = "#" in line or lines[i - 1].lstrip().startswith("#")
                assert explained, f"{manifest.name}:{i + 1} binds 0.0.0.0 without saying why"
    gpu = load_config(root / "manifests" / "colocate-gpu.yaml")
    assert gpu.serve.auth.keyed and not gpu.serve.auth.allow_remote_without_keys


def test_the_ports_of_one_cluster_are_distinct_and_avoid_the_configured_ones():
    from orchestrator.cluster.lifecycle import ClusterConfig, free_ports, ray_start_command

    for _ in range(50):
        ports = free_ports(6, avoid=(8265,))
        assert len(set(ports)) == 6 and 8265 not in ports
    cmd = ray_start_command(ClusterConfig(gcs_port=6390, dashboard_port=8265), "/tmp/x", 9999)
    chosen = [int(c.split("=")[1]) for c in cmd if c.startswith("--") and c.split("=")[0].endswith("-port")]
    assert len(chosen) == len(set(chosen)) == 7  # gcs, dashboard, 2 agent, metrics, runtime env, client
