"""`colocate profile`: drive a live vLLM engine through a designed sweep of batch compositions.

The engine is built from the same config as the replicas (model, engine kwargs, our scheduler),
so the same command profiles a CPU replica here and a GPU replica on a GPU node. It is stepped
directly (vLLM's LLMEngine), which gives exact control of what each step holds:

Each *scenario* starts `num_background` requests with a prompt of `context_tokens` (their
prefill runs in chunks of up to the engine's step budget), lets them decode, and while they
decode injects new prompts of `prefill_tokens` every few steps, so steps mix a prefill chunk
with a decode batch. A share of the requests is marked offline, as co-location will. Scenarios
are drawn from log-uniform ranges over the whole space the controller asks about (batch sizes up
to max_num_seqs, contexts up to the model's length, chunks up to the step budget), not a grid
corner; a fixed set of corner scenarios is always included.

The telemetry comes from the engine's own step ring (the same records a replica publishes).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Scenario:
    num_background: int
    context_tokens: int
    decode_steps: int
    prefill_tokens: int
    prefill_every_steps: int
    offline_share: float


def design(num_scenarios: int, *, max_num_seqs: int, max_model_len: int, max_step_tokens: int,
           seed: int = 0, max_scenario_prefill_tokens: int | None = None) -> list[Scenario]:
    """The sweep: corner scenarios plus log-uniform draws over batch size, context and chunk.

    A scenario's background prefill (batch x context) is capped at `max_scenario_prefill_tokens`
    (default 4 steps' worth): on a CPU a full step of prefill takes seconds, and the steps the
    controller cares about are the decode-heavy ones with a chunk of prefill beside them.
    """
    rng = np.random.default_rng(seed)
    max_ctx = max(32, max_model_len // 2)
    prefill_cap = max_scenario_prefill_tokens or 4 * max_step_tokens

    def log_uniform(lo: int, hi: int) -> int:
        return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))

    corners = [
        Scenario(1, 16, 24, 0, 0, 0.0),
        Scenario(max_num_seqs, 16, 24, 0, 0, 0.5),
        Scenario(max(1, max_num_seqs // 2), max_ctx, 16, 0, 0, 0.5),
        Scenario(1, 16, 16, max_step_tokens, 4, 0.0),
        Scenario(max(1, max_num_seqs // 4), 128, 24, 32, 2, 0.5),
    ]
    drawn = [
        Scenario(
            num_background=log_uniform(1, max_num_seqs),
            context_tokens=log_uniform(8, max_ctx),
            decode_steps=int(rng.integers(8, 32)),
            prefill_tokens=int(rng.choice([0, log_uniform(8, max_step_tokens)], p=[0.3, 0.7])),
            prefill_every_steps=int(rng.integers(1, 6)),
            offline_share=float(rng.choice([0.0, 0.25, 0.5, 0.75, 1.0])),
        )
        for _ in range(max(0, num_scenarios - len(corners)))
    ]
    capped = [replace(sc, context_tokens=max(8, min(sc.context_tokens, prefill_cap // sc.num_background)))
              for sc in corners[:num_scenarios] + drawn]
    return capped


def run_sweep(engine, channel, scenarios: list[Scenario], *, vocab_size: int, max_num_seqs: int,
              max_model_len: int, seed: int = 0, on_progress: Callable[[str], None] = print,
              progress_interval_s: float = 5.0) -> np.ndarray:
    """Run every scenario on `engine` (a vLLM LLMEngine); return the step rows it recorded."""
    from vllm import SamplingParams

    from orchestrator.engine.enforce import OFFLINE_PRIORITY

    rng = np.random.default_rng(seed + 1)
    rows: list[np.ndarray] = []
    seen = channel.num_steps()
    started = last = time.monotonic()
    next_id = 0

    def add(prompt_len: int, max_tokens: int, offline: bool) -> str:
        nonlocal next_id
        rid = f"p{next_id}"
        next_id += 1
        prompt = rng.integers(10, vocab_size - 1, size=max(1, prompt_len)).tolist()
        params = SamplingParams(max_tokens=max(1, max_tokens), ignore_eos=True)
        engine.add_request(rid, {"prompt_token_ids": prompt}, params, priority=OFFLINE_PRIORITY if offline else 0)
        return rid

    for i, sc in enumerate(scenarios):
        ctx = min(sc.context_tokens, max_model_len - sc.decode_steps - 8)
        ids = [add(ctx, sc.decode_steps, rng.random() < sc.offline_share) for _ in range(sc.num_background)]
        step = 0
        while engine.has_unfinished_requests():
            if (sc.prefill_tokens and step % max(1, sc.prefill_every_steps) == 0
                    and len(ids) < max_num_seqs and step > 0):
                ids.append(add(min(sc.prefill_tokens, max_model_len - 8), 2, rng.random() < sc.offline_share))
            engine.step()
            step += 1
            now = time.monotonic()
            if now - last >= progress_interval_s:
                last = now
                done = (i + 0.5) / len(scenarios)
                eta = (now - started) / done * (1 - done)
                on_progress(f"profile: scenario {i + 1}/{len(scenarios)}, "
                            f"{channel.num_steps() - seen + sum(len(r) for r in rows)} steps, "
                            f"{now - started:.0f} s elapsed, ETA {eta:.0f} s")
        new, seen = channel.steps_since(seen)
        rows.append(new)
    return np.concatenate(rows) if rows else np.empty((0, 0))


def profile(config, out: Path, *, num_scenarios: int = 60, seed: int = 0,
            on_progress: Callable[[str], None] = print) -> dict:
    """Build an engine like a replica's, run the sweep, write the step dataset to `out`."""
    from latency_model.schema import SCHEMA_VERSION
    from orchestrator.engine.channel import EngineChannel, rows_to_columns
    from orchestrator.engine.telemetry import export_parquet
    from orchestrator.names import ENV_ENGINE_CHANNEL
    from orchestrator.serving.app import engine_kwargs, replica_env, resolve_model_source

    source = resolve_model_source(config)
    kwargs = engine_kwargs(config)
    # Random prompts never share a prefix, so the profile sees true prefill cost either way.
    kwargs.setdefault("enable_prefix_caching", False)
    kwargs.pop("disable_log_stats", None)
    for key, value in replica_env(config.model_copy(update={
            "controller": config.controller.model_copy(update={"enabled": False})})).items():
        os.environ.setdefault(key, value)
    channel = EngineChannel.create()
    os.environ[ENV_ENGINE_CHANNEL] = str(channel.path)
    try:
        from vllm import LLM

        on_progress(f"profile: starting an engine on {source}")
        llm = LLM(model=source, **kwargs)
        engine = llm.llm_engine
        vcfg = engine.vllm_config
        max_num_seqs = vcfg.scheduler_config.max_num_seqs
        max_model_len = vcfg.model_config.max_model_len
        max_step_tokens = vcfg.scheduler_config.max_num_batched_tokens
        vocab_size = vcfg.model_config.get_vocab_size()
        scenarios = design(num_scenarios, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                           max_step_tokens=max_step_tokens, seed=seed)
        on_progress(f"profile: {len(scenarios)} scenarios (batch <= {max_num_seqs}, context <= "
                    f"{max_model_len}, step budget {max_step_tokens} tokens)")
        started = time.monotonic()
        rows = run_sweep(engine, channel, scenarios, vocab_size=vocab_size, max_num_seqs=max_num_seqs,
                         max_model_len=max_model_len, seed=seed, on_progress=on_progress)
        elapsed = time.monotonic() - started
        engine.engine_core.shutdown()
    finally:
        channel.close(unlink=True)
        os.environ.pop(ENV_ENGINE_CHANNEL, None)
    cols = rows_to_columns(rows)
    export_parquet(cols, out)
    records = cols["step_latency_ms"]
    summary = {
        "dataset": str(out), "schema_version": SCHEMA_VERSION, "num_steps": len(records),
        "num_scenarios": len(scenarios), "elapsed_s": round(elapsed, 1),
        "step_latency_ms_p50": float(np.median(records)) if len(records) else None,
        "max_decode_reqs": int(cols["num_decode_reqs"].max()) if len(records) else 0,
        "max_prefill_tokens": int(cols["num_prefill_tokens"].max()) if len(records) else 0,
        "max_decode_context_tokens": int(cols["max_decode_context_tokens"].max()) if len(records) else 0,
    }
    return summary
