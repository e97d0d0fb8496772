"""The Serve LLM config the app builder makes: our server class and the settings that make
co-location work. Component tier: imports Ray Serve LLM and vLLM (no cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.component

ROOT = Path(__file__).resolve().parents[2]


def test_the_llm_config_wires_our_server_class_priority_scheduling_and_unbatched_streams(monkeypatch):
    from orchestrator.config import parse_config
    from orchestrator.serving.app import build_llm_config
    from orchestrator.serving.server import ColocateLLMServer

    monkeypatch.chdir(ROOT)
    config = parse_config({"model": {"source": "org/model", "build_tiny": None}})
    llm = build_llm_config(config, "org/model")
    assert llm.server_cls is ColocateLLMServer
    assert llm.experimental_configs["stream_batching_interval_ms"] == 0
    assert llm.engine_kwargs["scheduling_policy"] == "priority"
    assert llm.engine_kwargs["scheduler_cls"] == "orchestrator.engine.scheduler.ColocateScheduler"
