"""Length-aware ordering in a real vLLM engine: vLLM's priority queue serves lower levels first
(shorter predicted replies), FCFS among equal levels, the scheduler's starvation guard
promotes a request that has waited past its bound, and `srpt` preempts a long chat request
early in its run for a short one, never late."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import MODEL_CACHE, ROOT

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).with_name("ordering_engine.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    if not (MODEL_CACHE / "config.json").exists():
        from orchestrator.models.tiny import build_tiny_model

        build_tiny_model(MODEL_CACHE, size="test")
    tmp = tmp_path_factory.mktemp("ordering")
    shutil.copy(SCRIPT, tmp / SCRIPT.name)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, SCRIPT.name, str(MODEL_CACHE)], cwd=tmp, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in out.stdout.splitlines()
             if line.split(" ", 1)[0] in ("ORDER", "STARVE", "PROMOTIONS", "SRPT")}
    return (json.loads(lines["ORDER"]), json.loads(lines["STARVE"]), float(lines["PROMOTIONS"]),
            json.loads(lines["SRPT"]))


def test_waiting_requests_run_by_level_then_by_arrival(run):
    order, _, _, _ = run
    assert order == ["blocker", "l4a", "l4b", "l17", "l30"]


def test_a_request_past_its_guard_is_served_before_the_short_ones_still_arriving(run):
    _, starve, promotions, _ = run
    assert promotions >= 1
    # Without the guard, "long" (level 8) would wait behind every level-1 request: 12 arrive,
    # one per finish. Promoted after a few steps, it runs within the first few.
    assert starve.index("long") < 4, starve


def test_a_long_chat_request_is_preempted_early_in_its_run_for_a_short_one_but_not_late(run):
    _, _, _, srpt = run
    # One slot: without preemption "quick" would wait for all 24 tokens of "early".
    assert srpt["early_preempted"] == 1, srpt
    assert srpt["order"][:2] == ["quick", "early"], srpt
    # "late" had produced 12 of its predicted 31 tokens (over a quarter): it finishes first.
    assert srpt["late_preempted"] == 0, srpt
    assert srpt["order"][2:] == ["late", "quick2"], srpt
