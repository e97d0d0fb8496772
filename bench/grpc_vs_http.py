"""TTFT and TPOT of the same streamed chat requests over gRPC and over HTTP, side by side.

    python -m bench.grpc_vs_http [--requests 40] [--prompt-tokens 64] [--max-tokens 32]
    python -m bench.grpc_vs_http --endpoint http://127.0.0.1:8000/v1 --grpc 127.0.0.1:9000 --model colocate-tiny

Without `--endpoint`/`--grpc` it brings up a stack of its own (`--config`, gRPC enabled, every
port free, its own state directory) and stops it afterwards. Requests go one at a time (so the
numbers compare the transports, not queueing), alternating protocol and which one goes first
in each pair, after a warm-up of two requests per protocol. Every request has the same shape
(prompt length, `max_tokens` with `ignore_eos`, temperature 0); the prompt text differs between
requests, so vLLM's prefix cache serves neither protocol's prefill from the other's.

Both protocols stream vLLM's chunks (over gRPC one `ChatChunk` each; the HTTP stream's opening
role-only chunk holds no token): one per engine output, which is one token unless the engine got
ahead of the stream. TTFT: from sending the request to the first token's chunk. TPOT: time between
the first and the last token's chunk over (output tokens - 1).
Clients: the `openai` package's async client (HTTP, server-sent events) and grpcio's asyncio stub.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator.stats import percentile
from profiler.workload import make_prompt

PROTOCOLS = ("grpc", "http")


@dataclass
class Timing:
    protocol: str
    index: int
    ttft_ms: float | None
    tpot_ms: float | None
    num_chunks: int
    completion_tokens: int | None


def summarize(timings: list[Timing]) -> dict[str, dict[str, Any]]:
    """p50/p99 TTFT and TPOT (ms) per protocol."""
    out = {}
    for proto in PROTOCOLS:
        rows = [t for t in timings if t.protocol == proto]
        ttft = [t.ttft_ms for t in rows if t.ttft_ms is not None]
        tpot = [t.tpot_ms for t in rows if t.tpot_ms is not None]
        out[proto] = {"n": len(rows), "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
                      "tpot_p50_ms": percentile(tpot, 50), "tpot_p99_ms": percentile(tpot, 99),
                      "mean_chunks": sum(t.num_chunks for t in rows) / len(rows) if rows else None}
    return out


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    def f(v):
        return "-" if v is None else f"{v:.1f}"

    names = {"grpc": "gRPC (grpcio aio)", "http": "HTTP (openai SSE)"}
    lines = [f"{'protocol':<18} {'n':>3} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9}  (ms)"]
    for proto in PROTOCOLS:
        s = summary[proto]
        lines.append(f"{names[proto]:<18} {s['n']:>3} {f(s['ttft_p50_ms']):>9} {f(s['ttft_p99_ms']):>9} "
                     f"{f(s['tpot_p50_ms']):>9} {f(s['tpot_p99_ms']):>9}")
    g, h = summary["grpc"], summary["http"]
    if g["ttft_p50_ms"] and h["ttft_p50_ms"] and g["tpot_p50_ms"] and h["tpot_p50_ms"]:
        lines.append(f"gRPC - HTTP: TTFT p50 {g['ttft_p50_ms'] - h['ttft_p50_ms']:+.1f} ms, "
                     f"TPOT p50 {g['tpot_p50_ms'] - h['tpot_p50_ms']:+.2f} ms")
    return "\n".join(lines)


def _timing(proto: str, index: int, start: float, stamps: list[float], tokens: int | None) -> Timing:
    ttft = (stamps[0] - start) * 1000.0 if stamps else None
    steps = (tokens or len(stamps)) - 1
    tpot = (stamps[-1] - stamps[0]) * 1000.0 / steps if len(stamps) > 1 and steps > 0 else None
    return Timing(proto, index, ttft, tpot, len(stamps), tokens)


async def _http_one(client, model: str, prompt: str, max_tokens: int, index: int) -> Timing:
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True,
        temperature=0.0, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        delta = chunk.choices[0].delta if chunk.choices else None
        if delta is not None and delta.content is not None and not delta.role:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return _timing("http", index, start, stamps, tokens)


async def _grpc_one(stub, model: str, prompt: str, max_tokens: int, index: int, metadata) -> Timing:
    from orchestrator.serving.grpc_api import chat_pb2

    request = chat_pb2.ChatRequest(model=model, messages=[chat_pb2.ChatMessage(role="user", content=prompt)],
                                   max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = None
    async for chunk in stub.Chat(request, metadata=metadata, timeout=600):
        if chunk.HasField("usage"):  # the final message, after the last token
            tokens = chunk.usage.completion_tokens
        else:
            stamps.append(time.perf_counter())
    return _timing("grpc", index, start, stamps, tokens)


async def measure(endpoint: str, grpc_target: str, model: str, *, num_requests: int, prompt_tokens: int,
                  max_tokens: int, api_key: str | None = None, warmup: int = 2,
                  on_progress: Callable[[str], None] = print) -> list[Timing]:
    import grpc
    from openai import AsyncOpenAI

    from orchestrator.serving.grpc_api import chat_pb2_grpc

    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    tag = f"gvh-{int(time.time())}"
    timings: list[Timing] = []
    async with AsyncOpenAI(base_url=endpoint, api_key=api_key or "unused", max_retries=0, timeout=600) as client, \
            grpc.aio.insecure_channel(grpc_target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)

        async def one(proto: str, i: int) -> Timing:
            prompt = make_prompt(prompt_tokens, f"{tag}-{proto}-{i}")
            if proto == "grpc":
                return await _grpc_one(stub, model, prompt, max_tokens, i, metadata)
            return await _http_one(client, model, prompt, max_tokens, i)

        for i in range(warmup):
            for proto in PROTOCOLS:
                await one(proto, -1 - i)
        for i in range(num_requests):
            for proto in (PROTOCOLS if i % 2 == 0 else PROTOCOLS[::-1]):
                t = await one(proto, i)
                if t.completion_tokens != max_tokens:
                    raise RuntimeError(f"{proto} request {i}: {t.completion_tokens} tokens, expected {max_tokens}")
                timings.append(t)
            if (i + 1) % 10 == 0:
                on_progress(f"[grpc-vs-http] {i + 1}/{num_requests} request pairs")
    return timings


def _own_stack_config(config_path: str | None):
    from orchestrator.cluster.lifecycle import free_port
    from orchestrator.config import load_config

    cfg = load_config(config_path)
    serve = cfg.serve.model_copy(update={
        "port": free_port(), "grpc": cfg.serve.grpc.model_copy(update={"enabled": True, "port": free_port()})})
    gcs = free_port()
    cluster = cfg.cluster.model_copy(update={"address": None, "gcs_port": gcs, "dashboard_port": free_port(),
                                             "temp_dir": f"/tmp/colocate-gvh-{gcs}"})
    return cfg.model_copy(update={"serve": serve, "cluster": cluster})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_vs_http", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40, help="Requests per protocol (default 40).")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--endpoint", help="OpenAI base URL of a running stack (with --grpc and --model).")
    parser.add_argument("--grpc", help="host:port of the running stack's gRPC chat service.")
    parser.add_argument("--model", help="Model id (default: the config's).")
    parser.add_argument("--api-key", default=os.environ.get("COLOCATE_API_KEY"),
                        help="API key for the gRPC service (default $COLOCATE_API_KEY).")
    parser.add_argument("--config", default=None, help="Config of the stack brought up here (default the embedded one).")
    parser.add_argument("--out", type=Path, help="Write the timings and summary as JSON here.")
    args = parser.parse_args(argv)

    from orchestrator.logs import quiet_http_client_logs

    quiet_http_client_logs()
    state = None
    if bool(args.endpoint) != bool(args.grpc):
        parser.error("--endpoint and --grpc go together")
    if args.endpoint:
        endpoint, target = args.endpoint, args.grpc
        model = args.model or _model_id(args.config)
    else:
        from orchestrator.cluster import lifecycle as cluster
        from orchestrator.names import ENV_STATE_DIR

        cfg = _own_stack_config(args.config)
        os.environ[ENV_STATE_DIR] = tempfile.mkdtemp(prefix="colocate-gvh-state-")
        print(f"[grpc-vs-http] bringing up a stack (HTTP {cfg.endpoint}, gRPC "
              f"{cfg.serve.grpc.host}:{cfg.serve.grpc.port})", flush=True)
        state = cluster.bring_up(cfg, on_progress=lambda m: print(m, flush=True))
        endpoint, target, model = cfg.endpoint, state.grpc_endpoint, args.model or cfg.model.id
    try:
        timings = asyncio.run(measure(endpoint, target, model, num_requests=args.requests,
                                      prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens,
                                      api_key=args.api_key, on_progress=lambda m: print(m, flush=True)))
    except Exception as err:  # noqa: BLE001 - reported before the stack goes (its exit can be abrupt)
        print(f"[grpc-vs-http] error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if state is not None:
            import ray

            from orchestrator.cluster import lifecycle as cluster

            # Leave the cluster before stopping it: a driver left connected waits on the dead GCS.
            ray.shutdown()
            for line in cluster.teardown(state):
                print(line, flush=True)
    summary = summarize(timings)
    print(f"{args.requests} streamed chat requests per protocol, one at a time, prompt ~{args.prompt_tokens} "
          f"tokens, {args.max_tokens} output tokens (ignore_eos), model {model}")
    print(format_table(summary), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "options": {k: str(v) for k, v in vars(args).items()
                                                                         if k != "api_key"},
                                        "timings": [asdict(t) for t in timings]}, indent=1) + "\n")
        print(f"written: {args.out}")
    return 0


def _model_id(config_path: str | None) -> str:
    from orchestrator.config import load_config

    return load_config(config_path).model.id


if __name__ == "__main__":
    sys.exit(main())
