import json

import pytest
from typer.testing import CliRunner

from orchestrator.cli.main import app
from orchestrator.config import parse_config
from orchestrator.serving.app import engine_kwargs, resolve_model_source

runner = CliRunner()


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("COLOCATE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "state"


def test_up_with_invalid_config_fails_before_starting_anything(tmp_path, state_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text("replicas:\n  num_replicas: -1\nserve:\n  host: 127.0.0.1\n  colour: blue\n")
    result = runner.invoke(app, ["up", "--config", str(bad)])
    assert result.exit_code == 2
    assert "replicas.num_replicas: Input should be greater than or equal to 1" in result.output
    assert "serve.colour: Extra inputs are not permitted" in result.output
    assert not state_dir.exists()


def test_up_refuses_when_a_stack_is_already_recorded(tmp_path, state_dir):
    state_dir.mkdir()
    (state_dir / "stack.json").write_text(json.dumps({
        "address": "127.0.0.1:1", "dashboard_url": None, "endpoint": "http://127.0.0.1:1/v1",
        "app_name": "colocate", "started_cluster": False,
    }))
    result = runner.invoke(app, ["up"])
    assert result.exit_code == 1
    assert "already up" in result.output


def test_down_and_status_without_a_stack():
    result = runner.invoke(app, ["down"])
    assert result.exit_code == 0 and "nothing to stop" in result.output
    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code == 1 and "no stack is up" in result.output


def test_model_tiny_rejects_unknown_size(tmp_path):
    """Rejected before anything is built (building one is tests/component/test_tiny_model.py's)."""
    result = runner.invoke(app, ["model", "tiny", "--out", str(tmp_path / "m"), "--size", "huge"])
    assert result.exit_code == 2 and "--size must be one of" in result.output


def test_cpu_engine_kwargs_force_priority_and_keep_user_settings():
    cfg = parse_config({"replicas": {"engine_kwargs": {"max_num_seqs": 8, "dtype": "float32"}}})
    kwargs = engine_kwargs(cfg)
    assert kwargs["scheduling_policy"] == "priority"
    assert kwargs["max_num_seqs"] == 8 and kwargs["dtype"] == "float32"
    assert kwargs["enforce_eager"] is True


def test_gpu_engine_kwargs_set_tensor_parallel_from_replica_gpus():
    cfg = parse_config({"replicas": {"accelerator": "gpu", "num_gpus_per_replica": 2}})
    kwargs = engine_kwargs(cfg)
    assert kwargs["tensor_parallel_size"] == 2 and "enforce_eager" not in kwargs


def test_model_source_hub_id_passes_through_and_missing_dir_without_build_is_an_error(tmp_path):
    """Building the missing directory (build_tiny) is tests/component/test_tiny_model.py's."""
    hub = parse_config({"model": {"source": "meta-llama/Llama-3.1-8B-Instruct", "build_tiny": None}})
    assert resolve_model_source(hub) == "meta-llama/Llama-3.1-8B-Instruct"
    missing = parse_config({"model": {"source": str(tmp_path / "nope"), "build_tiny": None}})
    with pytest.raises(FileNotFoundError, match="no model directory"):
        resolve_model_source(missing)
    assert not (tmp_path / "nope").exists()


def test_cpu_dtype_is_bf16_only_where_the_cpu_computes_it():
    from orchestrator.serving.app import cpu_dtype

    assert cpu_dtype("flags : fpu avx2 fma") == "float32"
    assert cpu_dtype("flags : fpu avx2 avx512f avx512_bf16") == "bfloat16"
    assert cpu_dtype("flags : fpu amx_bf16 amx_tile") == "bfloat16"


def test_a_model_on_disk_skips_ray_serve_llms_download_task_and_a_hub_id_keeps_it(tmp_path):
    import asyncio
    from types import SimpleNamespace

    from orchestrator.serving.app import build_llm_config
    from orchestrator.serving.startup import CALLBACK_CLS, LocalModelCallback

    config = parse_config({"model": {"id": "m", "source": str(tmp_path)}})
    assert build_llm_config(config, str(tmp_path)).callback_config.callback_class == CALLBACK_CLS
    assert build_llm_config(config, "org/some-model").callback_config.callback_class != CALLBACK_CLS

    def run_init_node(source: str) -> bool:
        llm_config = SimpleNamespace(model_loading_config=SimpleNamespace(model_source=source))
        callback = LocalModelCallback(llm_config=llm_config)
        asyncio.run(callback.run_callback("on_before_node_init"))
        return callback.ctx.run_init_node

    assert run_init_node(str(tmp_path)) is False
    assert run_init_node("org/some-model") is True
    assert run_init_node(str(tmp_path / "missing")) is True
