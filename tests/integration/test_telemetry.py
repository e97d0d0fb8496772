"""The telemetry scheduler inside a real vLLM-on-CPU engine records every step's composition."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from latency_model.schema import read_steps
from tests.integration.conftest import MODEL_CACHE, ROOT

pytestmark = pytest.mark.integration

ENGINE_SCRIPT = textwrap.dedent('''
    import sys
    from vllm import LLM, SamplingParams
    from orchestrator.engine.enforce import OFFLINE_PRIORITY

    if __name__ == "__main__":
        model = sys.argv[1]
        llm = LLM(model=model, dtype="bfloat16", enforce_eager=True, max_model_len=2048,
                  max_num_batched_tokens=256, scheduling_policy="priority", enable_prefix_caching=False,
                  scheduler_cls="orchestrator.engine.telemetry.TelemetryScheduler")
        words = "the batch latency of the model is low when the queue is short ".split()
        prompts = [" ".join(words[i % len(words)] for i in range(n)) for n in (40, 300, 600, 90)]
        params = SamplingParams(max_tokens=16, ignore_eos=True)
        outs = llm.generate(prompts, params, priority=[0, OFFLINE_PRIORITY, OFFLINE_PRIORITY, 0])
        print("PROMPT_TOKENS", sum(len(o.prompt_token_ids) for o in outs))
        print("OUTPUT_TOKENS", sum(len(o.outputs[0].token_ids) for o in outs))
        # The export runs in the engine's shutdown; vLLM's default grace before it kills the
        # engine process is 5 s, which a loaded CI host once ran out of.
        llm.llm_engine.engine_core.shutdown(timeout=120)
''')


def test_every_step_is_recorded_with_its_composition(tmp_path):
    if not (MODEL_CACHE / "config.json").exists():
        from orchestrator.models.tiny import build_tiny_model

        build_tiny_model(MODEL_CACHE, size="test")
    script = tmp_path / "engine.py"
    script.write_text(ENGINE_SCRIPT)
    steps_path = tmp_path / "steps.parquet"
    env = {**os.environ, "COLOCATE_TELEMETRY_PATH": str(steps_path), "VLLM_CPU_KVCACHE_SPACE": "1",
           "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(script), str(MODEL_CACHE)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    prompt_tokens = int(run.stdout.split("PROMPT_TOKENS")[1].split()[0])
    output_tokens = int(run.stdout.split("OUTPUT_TOKENS")[1].split()[0])

    steps = read_steps(steps_path).to_pydict()
    assert len(steps["step_latency_ms"]) >= 16
    assert all(ms > 0 for ms in steps["step_latency_ms"])
    # Every prompt token was computed (no prefix cache here) in some step's prefill, within the
    # 256-token step budget.
    assert sum(steps["num_prefill_tokens"]) == prompt_tokens
    assert max(steps["num_prefill_tokens"]) <= 256
    # One decode step per output token after the first (the first comes out of the prefill step).
    assert sum(steps["num_decode_reqs"]) == output_tokens - 4
    # The long offline prompts were chunked: some prefill ran with context already in the cache.
    assert max(steps["prefill_context_tokens"]) > 0
    assert max(steps["num_offline_reqs"]) == 2
    assert all(0.0 <= u <= 1.0 for u in steps["kv_cache_usage"])
    # Recording costs well under 2% of step time.
    overhead_pct = float(run.stderr.split("overhead ")[1].split("%")[0])
    assert overhead_pct < 2.0, overhead_pct
