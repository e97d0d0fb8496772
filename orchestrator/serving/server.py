"""Colocate's replica: a Ray Serve LLM server class around one vLLM engine.

This is the one place where a request's class is read and turned into vLLM priority, where the
replica keeps its own view of load per class, and where later admission and telemetry hooks live.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import time
from collections import Counter
from collections.abc import AsyncGenerator
from typing import Any

from ray import serve
from ray.serve.llm import LLMServer

from orchestrator.compat import ray_api
from orchestrator.control.reply import remaining_validity_s, reply_budget
from orchestrator.control.routing import (
    ROUTING_STATS_BUDGET_KEY,
    ROUTING_STATS_KEY,
    ROUTING_STATS_ONLINE_KEY,
    ROUTING_STATS_SEQ_KEY,
    offline_room,
)
from orchestrator.engine import shm
from orchestrator.engine.budget import UNLIMITED, OfflineBudget
from orchestrator.engine.channel import EngineChannel, latency_rows_to_columns, rows_to_columns
from orchestrator.engine.load import LoadWindow
from orchestrator.metrics import REPLICA_CONTROLLER_CONNECTED, make_metric
from orchestrator.names import (
    CONTROLLER_NAME,
    EMULATED_EXECUTOR,
    ENV_CONTROLLER_ENABLED,
    ENV_EMULATION,
    ENV_ENGINE_CHANNEL,
    ENV_FALLBACK_BUDGET,
    ENV_MAX_ONGOING_REQUESTS,
    ENV_REPORT_PERIOD_S,
    NAMESPACE,
)
from orchestrator.request_class import (
    REQUEST_CLASS_FIELD,
    RequestClass,
    parse_request_class,
    validate_messages,
    vllm_priority,
)
from orchestrator.serving.length_order import LengthOrdering, prompt_text
from orchestrator.serving.registry import get_or_create_registry

REPORT_PERIOD_S = 1.0
SHM_RECORD_PERIOD_S = 10.0
CONTROLLER_MISSING_WARN_EVERY_S = 300.0

log = logging.getLogger("ray.serve")


def controller_env(controller) -> dict[str, str]:
    """What a replica needs to know about the controller (a `ControllerConfig`), as env vars."""
    return {
        ENV_CONTROLLER_ENABLED: "1" if controller.enabled else "0",
        ENV_REPORT_PERIOD_S: str(controller.report_period_s),
        ENV_FALLBACK_BUDGET: f"{controller.fallback_offline_seqs},{controller.fallback_offline_tokens}",
    }


def _fallback_budget() -> OfflineBudget:
    if os.environ.get(ENV_CONTROLLER_ENABLED, "0") != "1":
        # No controller: offline work is limited only by vLLM's priorities (naive co-location).
        return OfflineBudget.flat(UNLIMITED, UNLIMITED)
    seqs, tokens = (int(v) for v in os.environ.get(ENV_FALLBACK_BUDGET, "1,64").split(","))
    return OfflineBudget.flat(seqs, tokens)


class EngineStatsHolder:
    """Latest scheduler statistics of one engine, written by vLLM's stat-logger callback."""

    def __init__(self) -> None:
        self.num_running_reqs = 0
        self.num_waiting_reqs = 0
        self.kv_cache_usage = 0.0
        self.num_steps = 0

    def stat_logger_factory(self):
        from orchestrator.compat.vllm_api import StatLoggerBase

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


def _start_engine(engine, vllm_engine_args, vllm_engine_config, placement_group, *, log_engine_metrics: bool):
    from orchestrator.compat.vllm_api import start_async_llm

    # Ray Serve LLM sets the executor backend itself (multiprocessing on CPU) over any in
    # engine_kwargs; the emulated engine's executor is chosen here instead, where the engine starts.
    executor = EMULATED_EXECUTOR if os.environ.get(ENV_EMULATION) else None
    return start_async_llm(vllm_engine_args, vllm_engine_config, placement_group,
                           [engine.stats.stat_logger_factory()], log_engine_metrics=log_engine_metrics,
                           executor_qualname=executor)


class ColocateVLLMEngine(ray_api.vllm_engine_class(_start_engine)):
    """Ray's vLLM engine with our stat logger attached, so the replica sees every step's stats."""

    def __init__(self, llm_config) -> None:
        super().__init__(llm_config)
        self.stats = EngineStatsHolder()


def _error_stream(message: str, code: int = 400, param: str | None = REQUEST_CLASS_FIELD) -> AsyncGenerator:
    async def gen():
        yield ray_api.error_response(message, code, "BadRequestError", param)

    return gen()


class ColocateLLMServer(LLMServer):
    """LLMServer that classifies every request and reports its load to the Colocate registry."""

    async def start(self):
        self._inflight: Counter[RequestClass] = Counter()
        self._completed: Counter[RequestClass] = Counter()
        # Serve LLM hands a streamed response over in batches (lists of SSE chunks); the largest
        # batch seen shows whether stream batching is really off (1) or merging tokens (>1).
        self._max_chunks_per_stream_write = 0
        self._model_id = ray_api.server_model_id(self)
        self._ordering = LengthOrdering.from_env()
        self._load = LoadWindow()
        self._budget: dict[str, Any] | None = None
        self._routing_stats_seq = 0
        self._steps_seen = 0
        # Throttle reactions seen in the step ring: (time of the burst, ms until offline work shrank).
        self._reactions: collections.deque[tuple[float, float]] = collections.deque(maxlen=200)
        self._last_step: tuple[float, float, float] | None = None  # (end, online, offline)
        self._pending_burst: tuple[float, float] | None = None  # (prev step end, offline before)
        # The engine process inherits this environment, so it finds the channel by name.
        self._channel = EngineChannel.create(fallback=_fallback_budget())
        self._latency_events_seen = 0
        os.environ[ENV_ENGINE_CHANNEL] = str(self._channel.path)
        start_s = time.monotonic()
        await super().start()
        self._engine_start_s = time.monotonic() - start_s
        self._shm_recorded: set[str] = set()
        self._report_task = asyncio.create_task(self._report_loop())
        self._replica_id = serve.get_replica_context().replica_id.unique_id
        self._connected_gauge = make_metric(REPLICA_CONTROLLER_CONNECTED)
        self._controller_warned_s = -math.inf
        if os.environ.get(ENV_CONTROLLER_ENABLED, "0") == "1":
            self._controller_state = "starting"
            self._controller_task = asyncio.create_task(self._controller_loop())
        else:
            self._controller_state = "off"
            self._connected_gauge.set(0.0, tags={"replica": self._replica_id})
            log.warning("colocate: co-location control is off (controller.enabled false): offline "
                        "work is limited only by vLLM's priorities")

    def __del__(self):
        chan = getattr(self, "_channel", None)
        if chan is not None:
            chan.path.unlink(missing_ok=True)

    def _classify(self, request) -> tuple[RequestClass, tuple[str, tuple[float, float]] | None]:
        """The request's class and ordering level, as its vLLM priority, and (prompt text,
        prediction) when its class is ordered by predicted length; ValueError (answered 400) for
        an unknown class or a chat message with a role OpenAI does not have."""
        if getattr(request, "messages", None) is not None:
            validate_messages(request.messages)
        extra = request.model_extra or {}
        request_class = parse_request_class(extra.get(REQUEST_CLASS_FIELD))
        level, predicted = 0, None
        if self._ordering.uses_predictions(request_class):
            text = prompt_text(request)
            level, prediction = self._ordering.level(request_class, text)
            predicted = (text, prediction) if prediction is not None else None
        request.priority = vllm_priority(request_class, level)
        return request_class, predicted

    async def _classified(self, request, raw_request_info, method):
        try:
            request_class, predicted = self._classify(request)
        except ValueError as err:
            param = REQUEST_CLASS_FIELD if REQUEST_CLASS_FIELD in str(err) else "messages"
            return _error_stream(str(err), param=param)
        stream = await method(request, raw_request_info)
        return self._count(stream, request_class, predicted)

    async def _count(self, stream, request_class: RequestClass, predicted=None):
        """Counts requests in flight and completed per class. Latencies are not taken here: the
        engine measures them per request (a non-streamed reply is one chunk here). A request
        ordered by predicted length reports its reply's length to the ordering's monitor: the
        usage of a non-streamed reply, the number of streamed content events otherwise (one per
        token, up to the few tokens the detokenizer merges: the monitor ranks, it does not count)."""
        self._inflight[request_class] += 1
        num_events, completion_tokens = 0, None
        try:
            async for item in stream:
                if isinstance(item, list):
                    self._max_chunks_per_stream_write = max(self._max_chunks_per_stream_write, len(item))
                if predicted is not None:
                    for part in item if isinstance(item, list) else (item,):
                        if isinstance(part, str):
                            num_events += part.count('"delta":{"content"') + part.count('"text":')
                        else:
                            usage = getattr(part, "usage", None)
                            completion_tokens = getattr(usage, "completion_tokens", completion_tokens)
                yield item
            if predicted is not None and (completion_tokens or num_events):
                text, prediction = predicted
                self._ordering.observe(text, prediction, completion_tokens or num_events)
        finally:
            self._inflight[request_class] -= 1
            self._completed[request_class] += 1

    async def chat(self, request, raw_request_info=None):
        return await self._classified(request, raw_request_info, super().chat)

    async def completions(self, request, raw_request_info=None):
        return await self._classified(request, raw_request_info, super().completions)

    def replica_stats(self) -> dict[str, Any]:
        """This replica's load, as reported to the registry and shown by `colocate status`."""
        engine_stats = getattr(ray_api.server_engine(self), "stats", None) or EngineStatsHolder()
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
            "length_order": self._ordering.status(),
            "max_chunks_per_stream_write": self._max_chunks_per_stream_write,
            "engine_start_s": self._engine_start_s,
            "reported_at_s": time.time(),
            "engine": self._channel.counters(),
            "budget": self._budget,
            "controller": self._controller_state,
        }

    def load_snapshot(self) -> dict[str, Any]:
        """What the controller decides on: this replica's online and offline load, its recent
        steps and the online latencies its clients saw."""
        rows, self._steps_seen = self._channel.steps_since(self._steps_seen)
        steps = rows_to_columns(rows)
        events, self._latency_events_seen = self._channel.latencies_since(self._latency_events_seen)
        counters = self._channel.counters()
        window = self._load.observe(steps, latency_rows_to_columns(events), time.time(),
                                    counters["online_running_tpot_max_ms"])
        self._track_reactions(steps)
        return {
            "replica_id": serve.get_replica_context().replica_id.unique_id,
            "model": self._model_id,
            "reported_at_s": time.time(),
            **{k: counters[k] for k in ("num_online_running", "num_online_waiting", "num_offline_running",
                                        "num_offline_waiting", "num_offline_paused",
                                        "num_offline_preempted_total", "num_throttled_steps",
                                        "num_fallback_steps", "online_context_tokens",
                                        "offline_context_tokens", "num_online_tokens_total",
                                        "num_offline_tokens_total", "num_offline_prompt_tokens_total",
                                        "num_offline_output_tokens_total", "num_steps_total",
                                        "step_time_s_total", "max_num_seqs")},
            "num_online_inflight": self._inflight[RequestClass.ONLINE],
            "num_offline_inflight": self._inflight[RequestClass.OFFLINE],
            "max_ongoing_requests": int(os.environ.get(ENV_MAX_ONGOING_REQUESTS, "0")) or None,
            **window,
            "budget_seq": self._channel.budget_seq(),
            "throttle_reactions": list(self._reactions),
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

    async def record_routing_stats(self) -> dict[str, Any]:
        """Serve's routing-stats hook (polled by Serve's controller, read by the request router):
        Ray's own stats, and this replica's offline room, budget and chat load (control.routing)."""
        stats = dict(await super().record_routing_stats() or {})
        budget = reply_budget(self._budget) if self._budget is not None else _fallback_budget()
        seqs, _ = budget.at(self._inflight[RequestClass.ONLINE])
        self._routing_stats_seq += 1
        stats[ROUTING_STATS_KEY] = offline_room(seqs, self._inflight[RequestClass.OFFLINE])
        stats[ROUTING_STATS_BUDGET_KEY] = seqs
        stats[ROUTING_STATS_ONLINE_KEY] = self._inflight[RequestClass.ONLINE]
        stats[ROUTING_STATS_SEQ_KEY] = self._routing_stats_seq
        return stats

    async def _controller_loop(self) -> None:
        """Report load to the controller; its reply is this replica's offline budget."""
        import ray

        period_s = float(os.environ.get(ENV_REPORT_PERIOD_S, "0.1"))
        controller = None
        while True:
            try:
                if controller is None:
                    controller = await asyncio.to_thread(ray.get_actor, CONTROLLER_NAME, namespace=NAMESPACE)
                sent_s = time.monotonic()
                reply = await controller.report.remote(self.load_snapshot())
                self._controller_seen("connected")
                if reply is not None:
                    self._budget = reply
                    valid_for_s = remaining_validity_s(reply, time.monotonic() - sent_s)
                    if valid_for_s > 0:
                        self._channel.write_budget(reply_budget(reply), valid_for_s=valid_for_s)
            except ValueError:  # ray.get_actor: no such actor
                self._controller_seen("missing")
                await asyncio.sleep(1.0)
            except Exception as err:  # noqa: BLE001 - the engine falls back on its own when we go quiet
                if controller is not None:
                    log.warning("colocate: controller report failed: %s", err)
                self._controller_seen("unreachable")
                controller = None
                await asyncio.sleep(1.0)
            await asyncio.sleep(period_s)

    def _controller_seen(self, state: str) -> None:
        """Record whether this replica's reports reach a controller: in `colocate status` (the
        registry report), a metric, and a log line on every change (and every few minutes while
        none is found, since an engine without one runs its fallback budget forever)."""
        now_s = time.monotonic()
        changed = state != self._controller_state
        self._controller_state = state
        if self._connected_gauge is not None:
            self._connected_gauge.set(1.0 if state == "connected" else 0.0, tags={"replica": self._replica_id})
        if state == "connected":
            if changed:
                log.info("colocate: controller found; offline budgets now come from it")
            return
        if changed or now_s - self._controller_warned_s >= CONTROLLER_MISSING_WARN_EVERY_S:
            self._controller_warned_s = now_s
            seqs, tokens = os.environ.get(ENV_FALLBACK_BUDGET, "1,64").split(",")
            log.warning(
                "colocate: no controller (actor %r in namespace %r is %s): this replica runs its "
                "fallback offline budget (%s sequences, %s tokens per step) until one answers. "
                "`colocate up` starts one; so does the Serve builder "
                "orchestrator.serving.app:build_from_args (serve run / serve deploy / KubeRay).",
                CONTROLLER_NAME, NAMESPACE, state, seqs, tokens)

    async def _report_loop(self) -> None:
        registry = None
        next_shm_record_s = 0.0
        while True:
            try:
                if registry is None:
                    registry = get_or_create_registry()
                await registry.report.remote(self.replica_stats())
            except Exception:  # noqa: BLE001 - reporting must never take a replica down
                registry = None
            if time.monotonic() >= next_shm_record_s:
                next_shm_record_s = time.monotonic() + SHM_RECORD_PERIOD_S
                await asyncio.to_thread(self._record_engine_segments)
            await asyncio.sleep(REPORT_PERIOD_S)

    def _record_engine_segments(self) -> None:
        """Note which shared-memory segments this replica's engine processes map, so that they
        can be removed if the engine is killed (engine.shm); stale records of engines already
        gone are swept on the way."""
        import psutil

        try:
            shm.sweep()
            pids = [p.pid for p in psutil.Process().children(recursive=True)]
            segments = shm.mapped_segments(pids)
            if segments and segments != self._shm_recorded:
                shm.write_record(os.getpid(), pids, segments)
                self._shm_recorded = segments
        except Exception as err:  # noqa: BLE001 - bookkeeping must never take a replica down
            log.debug("colocate: shared-memory record failed: %s", err)


ray_api.use_engine_class(ColocateLLMServer, ColocateVLLMEngine)
