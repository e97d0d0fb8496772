"""The main job on the embedded default: chat traffic and a batch job on the same replicas.

Brings the stack up (unless one is up), submits an offline batch job through Ray Jobs, replays
chat traffic from the Azure trace through the OpenAI endpoint at the same time, and prints what
each side got. Stops what it started unless told to keep it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.cluster import lifecycle as cluster
from orchestrator.cluster.jobs import submit_batch_job, wait_for_job
from orchestrator.config import ColocateConfig
from profiler.workload import (
    ARXIV_LENGTHS,
    AZURE_CONV,
    load_chat_trace,
    load_offline_lengths,
    run_chat_load,
    summarize_chat,
    write_batch_input,
)


def run_demo(config: ColocateConfig, *, duration_s: float, chat_rate_per_s: float, num_offline: int,
             keep: bool, on_progress: Callable[[str], None]) -> dict[str, Any]:
    state = cluster.StackState.load()
    started_here = state is None
    if started_here:
        state = cluster.bring_up(config, on_progress=on_progress)
    if not state.dashboard_url:
        raise cluster.StackError("the running stack has no job API address (joined cluster); use `colocate submit`")
    try:
        return _exercise(config, state, duration_s, chat_rate_per_s, num_offline, on_progress)
    finally:
        if started_here and not keep:
            for line in cluster.teardown(state):
                on_progress(line)


def _exercise(config, state, duration_s, chat_rate_per_s, num_offline, on_progress) -> dict[str, Any]:
    max_len = int(config.replicas.engine_kwargs.get("max_model_len", 2048))
    work = Path(".colocate/demo").resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not (AZURE_CONV.exists() and ARXIV_LENGTHS.exists()):
        raise FileNotFoundError(f"workload traces not found under {AZURE_CONV.parent}")
    # Lengths scaled into the tiny model's context (the trace's prompts average ~1,100 tokens).
    chat = load_chat_trace(rate_per_s=chat_rate_per_s, duration_s=duration_s, length_scale=0.1,
                           max_prompt_tokens=max_len // 4, max_output_tokens=64)
    offline = load_offline_lengths(num_requests=num_offline, length_scale=0.1,
                                   max_prompt_tokens=max_len // 4, max_output_tokens=64)
    batch_in = write_batch_input(offline, work / "batch-input.jsonl", config.model.id, prefix="demo")
    batch_out = work / f"batch-output-{int(time.time())}.jsonl"
    job_id = submit_batch_job(
        state.dashboard_url,
        ["--input", str(batch_in), "--output", str(batch_out), "--endpoint", state.endpoint,
         "--progress-interval-s", "3"],
        metadata={"colocate": "demo", "output": str(batch_out)},
    )
    on_progress(f"submitted batch job {job_id}: {len(offline)} offline requests -> {batch_out}")
    on_progress(f"replaying {len(chat)} chat requests from {AZURE_CONV.name} over {duration_s:.0f}s")
    t0 = time.monotonic()
    chat_results = asyncio.run(run_chat_load(state.endpoint, config.model.id, chat))
    chat_wall_s = time.monotonic() - t0
    status, _ = wait_for_job(state.dashboard_url, job_id, timeout_s=1800, on_progress=on_progress)
    records = [json.loads(x) for x in batch_out.read_text().splitlines()] if batch_out.exists() else []
    ok = [r for r in records if (r.get("response") or {}).get("status_code") == 200]
    tokens = sum(r["response"]["body"]["usage"]["completion_tokens"] for r in ok)
    return {
        "chat": {**summarize_chat(chat_results), "wall_s": chat_wall_s},
        "batch": {"job_id": job_id, "status": status, "num_requests": len(offline),
                  "num_results": len(records), "num_ok": len(ok), "completion_tokens": tokens,
                  "output": str(batch_out)},
        "endpoint": state.endpoint,
    }


def format_summary(summary: dict[str, Any]) -> str:
    c, b = summary["chat"], summary["batch"]

    def ms(v: float | None) -> str:
        return f"{v:7.1f} ms" if v is not None else "      n/a"

    lines = [
        "",
        "Colocate demo summary",
        f"  endpoint            {summary['endpoint']}",
        f"  chat requests       {c['num_ok']}/{c['num_requests']} ok over {c['wall_s']:.0f}s",
        f"  chat TTFT p50 / p99 {ms(c['ttft_p50_ms'])} / {ms(c['ttft_p99_ms'])}",
        f"  chat TPOT p50 / p99 {ms(c['tpot_p50_ms'])} / {ms(c['tpot_p99_ms'])}",
        f"  batch job           {b['job_id']} {b['status']}: {b['num_results']}/{b['num_requests']} results, "
        f"{b['num_ok']} ok, {b['completion_tokens']} tokens",
        f"  batch output        {b['output']}",
    ]
    if c["errors"]:
        lines.append(f"  chat errors         {c['errors']}")
    return "\n".join(lines)
