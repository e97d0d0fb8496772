"""Colocate's replica: a Ray Serve LLM server class around one vLLM engine.

This is the one place where a request's class is read and turned into vLLM priority, where the
replica keeps its own view of load per class, and where later admission and telemetry hooks live.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncGenerator
from typing import Any

from ray import serve
from ray.llm._internal.serve.core.configs.openai_api_models import ErrorInfo, ErrorResponse
from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
from ray.serve.llm import LLMServer

from orchestrator.registry import get_or_create_registry
from orchestrator.request_class import (
    REQUEST_CLASS_FIELD,
    RequestClass,
    parse_request_class,
    vllm_priority,
)

REPORT_PERIOD_S = 1.0


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
        start_s = time.monotonic()
        await super().start()
        self._engine_start_s = time.monotonic() - start_s
        self._report_task = asyncio.create_task(self._report_loop())

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
        try:
            async for item in stream:
                if isinstance(item, list):
                    self._max_chunks_per_stream_write = max(self._max_chunks_per_stream_write, len(item))
                yield item
        finally:
            self._inflight[request_class] -= 1
            self._completed[request_class] += 1

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
        }

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
