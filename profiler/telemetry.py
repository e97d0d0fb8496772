"""Per-step telemetry inside a vLLM engine: a Scheduler subclass named in `scheduler_cls`.

For every step it records the batch composition as the aggregates of `profiler.schema` (prefill
tokens and requests, prefill attention work, decode requests and the context they read, offline
requests, KV use) and the measured step latency: the time from the end of `schedule()` to the
start of `update_from_output()` for that step, which is the model's execution of exactly that
batch. Records go to a bounded ring, exportable to Parquet with the versioned schema, and, when
the replica gave the engine a channel (`orchestrator.engine_channel`), to the channel's step ring
too, where the replica and the controller read them while the engine runs.

vLLM marks the scheduler interface as not public; this is pinned to and tested against the
vllm 0.32 line.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from vllm.v1.core.sched.scheduler import Scheduler

from orchestrator.engine_channel import RING_COLUMNS, EngineChannel
from orchestrator.request_class import RequestClass, vllm_priority
from profiler.schema import STEP_SCHEMA

log = logging.getLogger(__name__)

RING_SIZE_ENV = "COLOCATE_TELEMETRY_RING_SIZE"
EXPORT_PATH_ENV = "COLOCATE_TELEMETRY_PATH"
_OFFLINE_PRIORITY = vllm_priority(RequestClass.OFFLINE)


def step_record(scheduler: Scheduler, scheduler_output) -> dict[str, Any]:
    """Aggregates of one scheduled step. Called after `schedule()`, which has already advanced
    each request's num_computed_tokens by its scheduled tokens."""
    num_prefill_tokens = num_prefill_reqs = prefill_ctx = 0
    attention2 = 0.0
    num_decode = decode_ctx = max_decode_ctx = num_offline = offline_tokens = 0
    for req_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
        req = scheduler.requests.get(req_id)
        if req is None:
            continue
        context = req.num_computed_tokens - num_tokens
        if req.priority >= _OFFLINE_PRIORITY:
            num_offline += 1
            offline_tokens += num_tokens
        if context < req.num_prompt_tokens:
            num_prefill_reqs += 1
            num_prefill_tokens += num_tokens
            prefill_ctx += context
            attention2 += num_tokens * (context + num_tokens / 2)
        else:
            num_decode += 1
            decode_ctx += context
            max_decode_ctx = max(max_decode_ctx, context)
    return {
        "num_prefill_tokens": num_prefill_tokens,
        "num_prefill_reqs": num_prefill_reqs,
        "prefill_context_tokens": prefill_ctx,
        "prefill_attention_tokens2": attention2,
        "num_decode_reqs": num_decode,
        "decode_context_tokens": decode_ctx,
        "max_decode_context_tokens": max_decode_ctx,
        "num_offline_reqs": num_offline,
        "num_online_reqs": len(scheduler_output.num_scheduled_tokens) - num_offline,
        "num_offline_tokens": offline_tokens,
        "num_online_tokens": scheduler_output.total_num_scheduled_tokens - offline_tokens,
        "kv_cache_usage": float(scheduler.kv_cache_manager.usage),
    }


class TelemetryScheduler(Scheduler):
    """vLLM's scheduler, plus one telemetry record per step in a bounded ring."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.telemetry: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=int(os.environ.get(RING_SIZE_ENV, "20000")))
        # Steps scheduled but not yet answered, oldest first (async scheduling keeps up to two).
        self._pending: collections.deque[tuple[float, dict[str, Any] | None]] = collections.deque()
        self._telemetry_cost_s = 0.0
        self.channel: EngineChannel | None = None
        self._publish_steps = True
        if os.environ.get(EXPORT_PATH_ENV):
            # Imported now, not at shutdown: the engine's parent kills it a few seconds after
            # SIGTERM (vLLM's default grace is 5 s), and on a loaded host the import alone can
            # take a good part of that (CI once lost the export).
            import pyarrow.parquet  # noqa: F401
        try:
            self.channel = EngineChannel.from_env()
        except Exception as err:  # noqa: BLE001 - an engine without a channel still serves
            log.warning("colocate: engine channel unavailable (%s); telemetry stays in the engine", err)

    def schedule(self, *args, **kwargs):
        output = super().schedule(*args, **kwargs)
        start = time.perf_counter()
        record = step_record(self, output) if output.total_num_scheduled_tokens > 0 else None
        now = time.perf_counter()
        self._telemetry_cost_s += now - start
        self._pending.append((now, record))
        return output

    def update_from_output(self, scheduler_output, model_runner_output):
        now = time.perf_counter()
        if self._pending:
            scheduled_at, record = self._pending.popleft()
            if record is not None:
                record["step_latency_ms"] = (now - scheduled_at) * 1000.0
                self.telemetry.append(record)
                if self.channel is not None and self._publish_steps:
                    self._publish(record)
        return super().update_from_output(scheduler_output, model_runner_output)

    def _publish(self, record: dict[str, Any]) -> None:
        start = time.perf_counter()
        try:
            record["end_time_s"] = time.time()
            self.channel.append_step(np.fromiter((record[c] for c in RING_COLUMNS), dtype=np.float64,
                                                 count=len(RING_COLUMNS)))
            self.channel.add_counter("num_online_tokens_total", record["num_online_tokens"])
            self.channel.add_counter("num_offline_tokens_total", record["num_offline_tokens"])
            self.channel.add_counter("num_steps_total", 1)
            self.channel.add_counter("step_time_s_total", record["step_latency_ms"] / 1000.0)
        except Exception as err:  # noqa: BLE001 - telemetry must never take the engine down
            log.warning("colocate: step ring write failed (%s); no longer publishing steps", err)
            self._publish_steps = False
        self._telemetry_cost_s += time.perf_counter() - start

    def overhead_fraction(self) -> float:
        """Time spent recording telemetry over the time of the steps in the ring (target < 2%)."""
        step_s = sum(r["step_latency_ms"] for r in self.telemetry) / 1000.0
        return self._telemetry_cost_s / step_s if step_s > 0 else 0.0

    def shutdown(self) -> None:
        log.warning("colocate telemetry: %d steps recorded, overhead %.4f%% of step time",
                    len(self.telemetry), 100.0 * self.overhead_fraction())
        path = os.environ.get(EXPORT_PATH_ENV)
        if path:
            try:
                export_parquet(list(self.telemetry), Path(path))
            except Exception as err:  # noqa: BLE001 - telemetry must never take the engine down
                log.warning("telemetry export to %s failed: %s", path, err)
        super().shutdown()


def export_parquet(records: list[dict[str, Any]] | dict[str, Any], path: Path) -> Path:
    """Write step records (a list of dicts, or a dict of columns) with the versioned step schema,
    atomically: a partial file never appears."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(records, dict):
        columns = records
    else:
        columns = {f.name: [r[f.name] for r in records] for f in STEP_SCHEMA}
    arrays = [pa.array(np.asarray(columns[f.name], dtype=np.int64 if pa.types.is_integer(f.type) else np.float64),
                       type=f.type) for f in STEP_SCHEMA]
    table = pa.Table.from_arrays(arrays, schema=STEP_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path
