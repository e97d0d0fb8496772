"""Colocate's replica: a Ray Serve LLM server class around one vLLM engine.

This is the one place where a request's class is read and turned into vLLM priority, where the
replica keeps its own view of load per class, and where later admission and telemetry hooks live.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncGenerator
from typing import Any

from ray import serve
from ray.llm._internal.serve.core.configs.openai_api_models import ErrorInfo, ErrorResponse
from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
from ray.serve.llm import LLMServer

from latency_model.features import INPUT_COLUMNS
from orchestrator.engine_channel import CHANNEL_ENV, UNLIMITED, EngineChannel, OfflineBudget, rows_to_columns
from orchestrator.registry import get_or_create_registry
from orchestrator.request_class import (
    REQUEST_CLASS_FIELD,
    RequestClass,
    parse_request_class,
    vllm_priority,
)

REPORT_PERIOD_S = 1.0
LATENCY_WINDOW_S = 5.0
"""Observed online TTFT/TPOT are p99s over requests of this recent window."""
CALIBRATION_COLUMNS = (*INPUT_COLUMNS, "step_latency_ms")
CALIBRATION_STEPS = 48
"""Latest engine steps sent with each report, for the controller to calibrate its model on."""

log = logging.getLogger("ray.serve")

_ENV_CONTROLLER = "COLOCATE_CONTROLLER_ENABLED"
_ENV_REPORT_PERIOD = "COLOCATE_CONTROLLER_REPORT_PERIOD_S"
_ENV_FALLBACK = "COLOCATE_FALLBACK_OFFLINE_BUDGET"


def controller_env(controller) -> dict[str, str]:
    """What a replica needs to know about the controller (a `ControllerConfig`), as env vars."""
    return {
        _ENV_CONTROLLER: "1" if controller.enabled else "0",
        _ENV_REPORT_PERIOD: str(controller.report_period_s),
        _ENV_FALLBACK: f"{controller.fallback_offline_seqs},{controller.fallback_offline_tokens}",
    }


def _fallback_budget() -> OfflineBudget:
    if os.environ.get(_ENV_CONTROLLER, "0") != "1":
        # No controller: offline work is limited only by vLLM's priorities (naive co-location).
        return OfflineBudget.flat(UNLIMITED, UNLIMITED)
    seqs, tokens = (int(v) for v in os.environ.get(_ENV_FALLBACK, "1,64").split(","))
    return OfflineBudget.flat(seqs, tokens)


def _p99(values) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))])


class OnlineLatencies:
    """Recent online TTFT and TPOT per request, as a client sees them (measured on the stream)."""

    def __init__(self, window_s: float = LATENCY_WINDOW_S) -> None:
        self.window_s = window_s
        self.ttft_ms: collections.deque[tuple[float, float]] = collections.deque()
        self.tpot_ms: collections.deque[tuple[float, float]] = collections.deque()
        self.inflight: dict[int, tuple[float, float, int]] = {}  # id -> (start, first, chunks)

    def start(self, key: int, now: float) -> None:
        self.inflight[key] = (now, 0.0, 0)

    def chunk(self, key: int, now: float) -> None:
        start, first, n = self.inflight[key]
        if n == 0:
            self.ttft_ms.append((now, (now - start) * 1000.0))
            first = now
        self.inflight[key] = (start, first, n + 1)

    def end(self, key: int, now: float) -> None:
        _, first, n = self.inflight.pop(key)
        if n > 2:
            self.tpot_ms.append((now, (now - first) * 1000.0 / (n - 1)))

    def p99s(self, now: float) -> tuple[float | None, float | None]:
        for q in (self.ttft_ms, self.tpot_ms):
            while q and q[0][0] < now - self.window_s:
                q.popleft()
        running = [(now - first) * 1000.0 / (n - 1) for _, first, n in self.inflight.values() if n > 2]
        return _p99([v for _, v in self.ttft_ms]), _p99([v for _, v in self.tpot_ms] + running)


class EngineStatsHolder:
    """Latest scheduler statistics of one engine, written by vLLM's stat-logger callback."""

    def __init__(self) -> None:
        self.num_running_reqs = 0
        self.num_waiting_reqs = 0
        self.kv_cache_usage = 0.0
        self.num_steps = 0

    def stat_logger_factory(self):
        from vllm.v1.metrics.loggers import StatLoggerBase

        holder = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
                if scheduler_stats is None:
                    return
                holder.num_running_reqs = scheduler_stats.num_running_reqs
                holder.num_waiting_reqs = scheduler_stats.num_waiting_reqs
                holder.kv_cache_usage = scheduler_stats.kv_cache_usage
                holder.num_steps += 1

            def log_engine_initialized(self) -> None:
                pass

        return _Logger


class ColocateVLLMEngine(VLLMEngine):
    """Ray's vLLM engine with our stat logger attached, so the replica sees every step's stats."""

    def __init__(self, llm_config) -> None:
        super().__init__(llm_config)
        self.stats = EngineStatsHolder()

    def _start_async_llm_engine(self, vllm_engine_args, vllm_engine_config, placement_group):
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.executor.abstract import Executor

        vllm_engine_config.parallel_config.placement_group = placement_group
        loggers = [self.stats.stat_logger_factory()]
        if self.llm_config.log_engine_metrics:
            from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

            loggers.append(RayPrometheusStatLogger)
        return AsyncLLM(
            vllm_config=vllm_engine_config,
            executor_class=Executor.get_class(vllm_engine_config),
            log_requests=vllm_engine_args.enable_log_requests,
            log_stats=True,
            stat_loggers=loggers,
        )


def _error_stream(message: str, code: int = 400) -> AsyncGenerator[ErrorResponse, None]:
    async def gen():
        yield ErrorResponse(
            error=ErrorInfo(message=message, type="BadRequestError", code=code, param=REQUEST_CLASS_FIELD)
        )

    return gen()


class ColocateLLMServer(LLMServer):
    """LLMServer that classifies every request and reports its load to the Colocate registry."""

    _default_engine_cls = ColocateVLLMEngine

    async def start(self):
        self._inflight: Counter[RequestClass] = Counter()
        self._completed: Counter[RequestClass] = Counter()
        # Serve LLM hands a streamed response over in batches (lists of SSE chunks); the largest
        # batch seen shows whether stream batching is really off (1) or merging tokens (>1).
        self._max_chunks_per_stream_write = 0
        self._model_id = self._llm_config.model_id
        self._latencies = OnlineLatencies()
        self._next_key = 0
        self._budget: dict[str, Any] | None = None
        self._steps_seen = 0
        # Latencies of recent steps that held online requests: (end time, ms), LATENCY_WINDOW_S.
        self._online_steps: collections.deque[tuple[float, float]] = collections.deque()
        self._recent_steps: collections.deque[tuple[float, ...]] = collections.deque(maxlen=CALIBRATION_STEPS)
        # Throttle reactions seen in the step ring: (time of the burst, ms until offline work shrank).
        self._reactions: collections.deque[tuple[float, float]] = collections.deque(maxlen=200)
        self._last_step: tuple[float, float, float] | None = None  # (end, online, offline)
        self._pending_burst: tuple[float, float] | None = None  # (prev step end, offline before)
        # The engine process inherits this environment, so it finds the channel by name.
        self._channel = EngineChannel.create(fallback=_fallback_budget())
        os.environ[CHANNEL_ENV] = str(self._channel.path)
        start_s = time.monotonic()
        await super().start()
        self._engine_start_s = time.monotonic() - start_s
        self._report_task = asyncio.create_task(self._report_loop())
        if os.environ.get(_ENV_CONTROLLER, "0") == "1":
            self._controller_task = asyncio.create_task(self._controller_loop())

    def __del__(self):
        chan = getattr(self, "_channel", None)
        if chan is not None:
            chan.path.unlink(missing_ok=True)

    def _classify(self, request) -> RequestClass:
        extra = request.model_extra or {}
        request_class = parse_request_class(extra.get(REQUEST_CLASS_FIELD))
        request.priority = vllm_priority(request_class)
        return request_class

    async def _classified(self, request, raw_request_info, method):
        try:
            request_class = self._classify(request)
        except ValueError as err:
            return _error_stream(str(err))
        stream = await method(request, raw_request_info)
        return self._count(stream, request_class)

    async def _count(self, stream, request_class: RequestClass):
        self._inflight[request_class] += 1
        online = request_class is RequestClass.ONLINE
        key = self._next_key
        self._next_key += 1
        if online:
            self._latencies.start(key, time.monotonic())
        try:
            async for item in stream:
                if isinstance(item, list):
                    self._max_chunks_per_stream_write = max(self._max_chunks_per_stream_write, len(item))
                if online:
                    for _ in range(len(item) if isinstance(item, list) else 1):
                        self._latencies.chunk(key, time.monotonic())
                yield item
        finally:
            self._inflight[request_class] -= 1
            self._completed[request_class] += 1
            if online:
                self._latencies.end(key, time.monotonic())

    async def chat(self, request, raw_request_info=None):
        return await self._classified(request, raw_request_info, super().chat)

    async def completions(self, request, raw_request_info=None):
        return await self._classified(request, raw_request_info, super().completions)

    def replica_stats(self) -> dict[str, Any]:
        """This replica's load, as reported to the registry and shown by `colocate status`."""
        engine_stats = getattr(self.engine, "stats", None) or EngineStatsHolder()
        ctx = serve.get_replica_context()
        return {
            "replica_id": ctx.replica_id.unique_id,
            "deployment": ctx.deployment,
            "model": self._model_id,
            "num_running_reqs": engine_stats.num_running_reqs,
            "num_waiting_reqs": engine_stats.num_waiting_reqs,
            "kv_cache_usage": engine_stats.kv_cache_usage,
            "num_engine_steps": engine_stats.num_steps,
            "num_inflight": {c.value: self._inflight[c] for c in RequestClass},
            "num_completed": {c.value: self._completed[c] for c in RequestClass},
            "max_chunks_per_stream_write": self._max_chunks_per_stream_write,
            "engine_start_s": self._engine_start_s,
            "reported_at_s": time.time(),
            "engine": self._channel.counters(),
            "budget": self._budget,
        }

    def load_snapshot(self) -> dict[str, Any]:
        """What the controller decides on: this replica's online and offline load, its recent
        steps and the online latencies its clients saw."""
        now = time.monotonic()
        rows, self._steps_seen = self._channel.steps_since(self._steps_seen)
        steps = rows_to_columns(rows)
        counters = self._channel.counters()
        ttft_p99, tpot_p99 = self._latencies.p99s(now)
        with_online = steps["num_online_reqs"] > 0
        self._online_steps.extend(zip(steps["end_time_s"][with_online], steps["step_latency_ms"][with_online]))
        self._track_reactions(steps)
        self._recent_steps.extend(zip(*(steps[c] for c in CALIBRATION_COLUMNS)))
        horizon = time.time() - LATENCY_WINDOW_S
        while self._online_steps and self._online_steps[0][0] < horizon:
            self._online_steps.popleft()
        return {
            "replica_id": serve.get_replica_context().replica_id.unique_id,
            "model": self._model_id,
            "reported_at_s": time.time(),
            **{k: counters[k] for k in ("num_online_running", "num_online_waiting", "num_offline_running",
                                        "num_offline_waiting", "num_offline_paused",
                                        "num_offline_preempted_total", "num_throttled_steps",
                                        "num_fallback_steps", "online_context_tokens",
                                        "offline_context_tokens", "num_online_tokens_total",
                                        "num_offline_tokens_total", "num_steps_total",
                                        "step_time_s_total", "max_num_seqs")},
            "num_online_inflight": self._inflight[RequestClass.ONLINE],
            "num_offline_inflight": self._inflight[RequestClass.OFFLINE],
            "kv_cache_usage": float(steps["kv_cache_usage"][-1]) if len(rows) else None,
            "num_steps": len(rows),
            "step_p99_ms": _p99([ms for _, ms in self._online_steps]),
            "observed_ttft_p99_ms": ttft_p99,
            "observed_tpot_p99_ms": tpot_p99,
            "budget_seq": self._channel.budget_seq(),
            "throttle_reactions": list(self._reactions),
            "recent_steps": {c: [float(row[i]) for row in self._recent_steps]
                             for i, c in enumerate(CALIBRATION_COLUMNS)},
        }

    def _track_reactions(self, steps: dict[str, Any]) -> None:
        """A burst is a step holding at least two more online requests than the one before, while
        offline work ran; its reaction time runs from the end of the step before the burst to the
        end of the first step with less offline work (the step that admitted the burst, when the
        engine's budget table already cut offline work there)."""
        for end, online, offline in zip(steps["end_time_s"], steps["num_online_reqs"], steps["num_offline_reqs"]):
            if self._pending_burst is not None:
                started, before = self._pending_burst
                if offline < before:
                    self._reactions.append((started, (end - started) * 1000.0))
                    self._pending_burst = None
                elif end - started > 10.0:
                    self._pending_burst = None
            if self._last_step is not None:
                prev_end, prev_online, prev_offline = self._last_step
                if online >= prev_online + 2 and prev_offline > 0 and self._pending_burst is None:
                    if offline < prev_offline:
                        self._reactions.append((prev_end, (end - prev_end) * 1000.0))
                    else:
                        self._pending_burst = (prev_end, prev_offline)
            self._last_step = (end, online, offline)

    async def _controller_loop(self) -> None:
        """Report load to the controller; its reply is this replica's offline budget."""
        import ray

        from orchestrator.controller import CONTROLLER_NAME, NAMESPACE

        period_s = float(os.environ.get(_ENV_REPORT_PERIOD, "0.1"))
        controller = None
        while True:
            try:
                if controller is None:
                    controller = await asyncio.to_thread(ray.get_actor, CONTROLLER_NAME, namespace=NAMESPACE)
                reply = await controller.report.remote(self.load_snapshot())
                if reply is not None:
                    self._budget = reply
                    self._channel.write_budget(
                        OfflineBudget(tuple(reply["max_offline_seqs"]), tuple(reply["max_offline_tokens"])),
                        valid_for_s=reply["valid_for_s"])
            except Exception as err:  # noqa: BLE001 - the engine falls back on its own when we go quiet
                if controller is not None:
                    log.warning("colocate: controller report failed: %s", err)
                controller = None
                await asyncio.sleep(1.0)
            await asyncio.sleep(period_s)

    async def _report_loop(self) -> None:
        registry = None
        while True:
            try:
                if registry is None:
                    registry = get_or_create_registry()
                await registry.report.remote(self.replica_stats())
            except Exception:  # noqa: BLE001 - reporting must never take a replica down
                registry = None
            await asyncio.sleep(REPORT_PERIOD_S)
