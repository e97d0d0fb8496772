"""The unit tier's promise: what it tests imports no vLLM, torch, transformers or tokenizers (those
are the component tier's). Checked in a fresh interpreter, so other tests' imports do not hide it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UNIT_TIER_MODULES = (
    "orchestrator.control.policy",
    "orchestrator.control.controller",
    "orchestrator.engine.enforce",
    "orchestrator.engine.plan",
    "orchestrator.engine.channel",
    "orchestrator.config",
    "jobs.batch",
    "latency_model.model",
    "latency_model.fast_trees",
    # Imported at module level by unit test files (test_cli_and_app.py).
    "orchestrator.cli.main",
    "orchestrator.serving.app",
)
HEAVY = ("vllm", "torch", "transformers", "tokenizers")


def test_unit_tier_modules_import_no_vllm_torch_transformers_or_tokenizers():
    code = (
        "import importlib, json, sys\n"
        f"for name in {UNIT_TIER_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
