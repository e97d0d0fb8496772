from pathlib import Path

import pytest
import yaml

from orchestrator.config import ColocateConfig, ConfigError, dump_config, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
STACK_MANIFESTS = sorted(
    p for p in (ROOT / "manifests").glob("*.yaml")
    if (yaml.safe_load(p.read_text()) or {}).get("kind") == "ColocateConfig"
)


def test_every_colocate_manifest_validates():
    assert (ROOT / "manifests" / "colocate.yaml") in STACK_MANIFESTS
    for path in STACK_MANIFESTS:
        load_config(path)


def test_every_yaml_in_manifests_is_known_and_parses():
    kinds = {}
    for path in sorted((ROOT / "manifests").glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
        kinds[path.name] = docs[0].get("kind") or "serve-config"
    assert set(kinds.values()) >= {"ColocateConfig", "RayService", "serve-config"}


def test_serve_config_manifest_builds_our_application(monkeypatch):
    # Building the Serve application itself starts Ray; that is covered by `colocate up` in the
    # integration tests. Here: the args resolve to a valid config and our classes are wired in.
    from orchestrator.serving.app import INGRESS_CLS, SERVER_CLS, config_from_args

    monkeypatch.chdir(ROOT)
    serve_cfg = yaml.safe_load((ROOT / "manifests" / "serve.yaml").read_text())
    [app_cfg] = serve_cfg["applications"]
    assert app_cfg["import_path"] == "orchestrator.serving.app:build_from_args"
    assert serve_cfg["http_options"]["host"] == "127.0.0.1"
    config, base = config_from_args({**app_cfg["args"], "config": {"model": {"source": "org/model", "build_tiny": None}}})
    assert config.replicas == load_config(ROOT / "manifests" / "colocate.yaml").replicas
    assert base == ROOT  # no base_dir: the builder's working directory
    assert SERVER_CLS == "orchestrator.serving.server:ColocateLLMServer"
    assert INGRESS_CLS == "orchestrator.serving.ingress:ColocateIngress"
    with pytest.raises(ValueError, match="unknown application args"):
        config_from_args({"config_file": "x"})


def test_application_args_resolve_against_base_dir(tmp_path, monkeypatch):
    """`serve deploy` builds the app in Serve's controller, whose working directory is not the
    project: `base_dir` says where the config and the paths in it are."""
    from orchestrator.serving.app import _rebased_model_source, config_from_args

    monkeypatch.chdir(tmp_path)
    config, base = config_from_args({"config_path": "manifests/colocate.yaml", "base_dir": str(ROOT)})
    assert base == ROOT and config.model.id == load_config(ROOT / "manifests" / "colocate.yaml").model.id
    assert _rebased_model_source(".colocate/models/tiny", ROOT) == str(ROOT / ".colocate/models/tiny")
    assert _rebased_model_source("org/model", ROOT) == "org/model"  # a hub id stays one
    assert _rebased_model_source("/abs/model", ROOT) == "/abs/model"
    with pytest.raises(ConfigError, match="cannot read"):
        config_from_args({"config_path": "manifests/colocate.yaml"})  # not under tmp_path


def test_rayservice_manifest_points_at_the_gpu_config():
    docs = list(yaml.safe_load_all((ROOT / "manifests" / "kuberay-rayservice.yaml").read_text()))
    serve_cfg = yaml.safe_load(docs[0]["spec"]["serveConfigV2"])
    args = serve_cfg["applications"][0]["args"]
    assert (Path(args["base_dir"]) / args["config_path"]) == Path("/app/manifests/colocate-gpu.yaml")
    gpu = load_config(ROOT / "manifests" / "colocate-gpu.yaml")
    assert gpu.replicas.accelerator == "gpu"


def test_default_manifest_equals_embedded_defaults_where_it_matters():
    cfg = load_config(ROOT / "manifests" / "colocate.yaml")
    assert cfg.serve.host == "127.0.0.1" and cfg.cluster.node_ip == "127.0.0.1"
    assert cfg.endpoint == "http://127.0.0.1:8000/v1"
    assert cfg.cluster.dashboard_port == 8265
    assert cfg.serve.stream_batching_interval_ms == 0


def test_dump_then_parse_round_trips():
    cfg = parse_config({"replicas": {"num_replicas": 3, "engine_kwargs": {"max_num_seqs": 8}}})
    assert parse_config(yaml.safe_load(dump_config(cfg))) == cfg


@pytest.mark.parametrize(
    "data, path, reason",
    [
        ({"replicas": {"num_replicas": 0}}, "replicas.num_replicas", "greater than or equal to 1"),
        ({"replicas": {"num_replicas": "two"}}, "replicas.num_replicas", "valid integer"),
        ({"serve": {"port": 70000}}, "serve.port", "less than or equal to 65535"),
        ({"serve": {"prot": 8000}}, "serve.prot", "Extra inputs are not permitted"),
        ({"replicas": {"accelerator": "tpu"}}, "replicas.accelerator", "'cpu' or 'gpu'"),
        ({"replicas": {"engine_kwargs": {"model": "x"}}}, "replicas", "may not set ['model']"),
        ({"model": {"build_tiny": "huge"}}, "model.build_tiny", "'test' or 'bench'"),
        ({"version": 2}, "version", "1"),
    ],
)
def test_invalid_config_names_field_and_reason(data, path, reason):
    with pytest.raises(ConfigError) as info:
        parse_config(data, "x.yaml")
    message = str(info.value)
    assert message.startswith("x.yaml: invalid configuration")
    line = next(ln for ln in message.splitlines() if ln.strip().startswith(path + ":"))
    assert reason in line


def test_unparsable_yaml_and_missing_file_are_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("serve: [port: 1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(top)


def test_empty_file_gives_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == ColocateConfig()


def test_every_manifest_model_has_slo_targets_in_the_file_it_names():
    """A stack whose model has no entry in its SLO file runs at the fallback budget forever."""
    from orchestrator.control.slo import load_slo

    for manifest in sorted((ROOT / "manifests").glob("colocate*.yaml")) + [ROOT / "manifests" / "whatif-llama2-7b-a100.yaml"]:
        cfg = load_config(manifest)
        slo_path = ROOT / cfg.controller.slo_path
        assert cfg.model.id in load_slo(slo_path).models, f"{manifest.name}: {cfg.model.id} not in {slo_path.name}"

