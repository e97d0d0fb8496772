"""Opt-in GPU check: the same stack on official vLLM with one GPU per replica.

Run on a GPU node installed with `COLOCATE_EXTRA=gpu scripts/bootstrap`: `make test-gpu`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml
from openai import OpenAI

from orchestrator.cluster.lifecycle import free_port
from tests.integration.conftest import MODEL_CACHE, ROOT

pytestmark = pytest.mark.gpu

if shutil.which("nvidia-smi") is None:
    pytest.skip("no NVIDIA GPU on this machine", allow_module_level=True)


def test_chat_on_a_gpu_replica(tmp_path):
    port, gcs, dash = free_port(), free_port(), free_port()
    cfg = {
        "model": {"source": str(MODEL_CACHE), "build_tiny": "test"},
        "replicas": {"accelerator": "gpu", "num_gpus_per_replica": 1,
                     "engine_kwargs": {"max_model_len": 2048, "gpu_memory_utilization": 0.3}},
        "serve": {"port": port},
        "cluster": {"gcs_port": gcs, "dashboard_port": dash},
    }
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "COLOCATE_STATE_DIR": str(tmp_path / "state")}
    cmd = [sys.executable, "-m", "orchestrator.cli"]
    up = subprocess.run([*cmd, "up", "-c", str(path)], cwd=ROOT, env=env, capture_output=True, text=True)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        resp = client.chat.completions.create(model="colocate-tiny", max_tokens=8,
                                              messages=[{"role": "user", "content": "hi"}],
                                              extra_body={"ignore_eos": True})
        assert resp.usage.completion_tokens == 8
    finally:
        subprocess.run([*cmd, "down"], cwd=ROOT, env=env)
