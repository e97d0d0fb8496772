"""Per-step and per-request telemetry inside a vLLM engine: a Scheduler subclass named in
`scheduler_cls`.

For every step it records the batch composition as the aggregates of `latency_model.schema`
(prefill tokens and requests, prefill attention work, decode requests and the context they read,
offline requests, KV use) and the measured step latency: the time from the end of `schedule()`
to the start of `update_from_output()` for that same step (paired by the scheduler output object,
so with async scheduling, where two steps are in flight, each step gets its own latency). Records
go to a bounded ring, exportable to Parquet with the versioned schema, and, when the replica gave
the engine a channel (`orchestrator.engine.channel`), to the channel's step ring too.

For every online request it records, from the engine's own clock, the time to its first token
(from the front end's arrival time) and, when it finishes, its time per output token. These are
the latencies the controller holds against the SLO: measured where the tokens are produced, they
are the same for a streamed and a non-streamed reply (counting response chunks at the replica
read a whole non-streamed reply as its time to first token).
"""

from __future__ import annotations

import collections
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from latency_model.batch import offline_counts, step_aggregates
from latency_model.schema import STEP_SCHEMA
from orchestrator.compat.vllm_api import Scheduler, SchedulerAccess
from orchestrator.engine.channel import RING_COLUMNS, EngineChannel
from orchestrator.engine.load import running_tpot_ms
from orchestrator.engine.step_timer import StepTimer
from orchestrator.names import ENV_ENGINE_STEP_DELAY_MS, ENV_TELEMETRY_PATH, ENV_TELEMETRY_RING_SIZE
from orchestrator.request_class import RequestClass, vllm_priority

log = logging.getLogger(__name__)

_OFFLINE_PRIORITY = vllm_priority(RequestClass.OFFLINE)


def step_record(access: SchedulerAccess, scheduler_output) -> dict[str, Any]:
    """Aggregates of one scheduled step. Called after `schedule()`, which has already advanced
    each request's num_computed_tokens by its scheduled tokens."""
    scheduled = access.scheduled_tokens(scheduler_output)
    batch = []
    for req_id, num_tokens in scheduled.items():
        req = access.request(req_id)
        if req is None:
            continue
        num_prompt = access.num_prompt_tokens(req)
        # A decode step yields one token; so does the prefill chunk that completes the prompt.
        batch.append((access.context_tokens(req) - num_tokens, num_tokens, num_prompt, num_prompt,
                      access.priority(req) >= _OFFLINE_PRIORITY))
    offline = offline_counts(batch)
    return {
        **step_aggregates(b[:3] for b in batch),
        **offline,
        "num_online_reqs": len(scheduled) - offline["num_offline_reqs"],
        "num_online_tokens": access.total_scheduled_tokens(scheduler_output) - offline["num_offline_tokens"],
        "kv_cache_usage": access.kv_cache_usage(),
    }


class TelemetryScheduler(Scheduler):
    """vLLM's scheduler, plus one telemetry record per step in a bounded ring."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.access = SchedulerAccess(self)
        self.telemetry: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=int(os.environ.get(ENV_TELEMETRY_RING_SIZE, "20000")))
        self._steps = StepTimer()
        self._step_delay_s = float(os.environ.get(ENV_ENGINE_STEP_DELAY_MS, "0") or 0) / 1000.0
        self._first_token_s: dict[str, float] = {}  # online request id -> wall time of its first token
        self._telemetry_cost_s = 0.0
        self.channel: EngineChannel | None = None
        self._publish_steps = True
        if os.environ.get(ENV_TELEMETRY_PATH):
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
        record = step_record(self.access, output) if self.access.total_scheduled_tokens(output) > 0 else None
        now = time.perf_counter()
        self._telemetry_cost_s += now - start
        if record is not None:
            self._steps.scheduled(output, record, now)
        return output

    def update_from_output(self, scheduler_output, model_runner_output):
        if self._step_delay_s > 0 and self.access.total_scheduled_tokens(scheduler_output) > 0:
            time.sleep(self._step_delay_s)  # an emulated slower host: the step takes this much longer
        answered = self._steps.answered(scheduler_output, time.perf_counter())
        if answered is not None:
            record, latency_ms = answered
            record["step_latency_ms"] = latency_ms
            self.telemetry.append(record)
            if self.channel is not None and self._publish_steps:
                self._publish(record)
        online = self._online_scheduled(scheduler_output)
        result = super().update_from_output(scheduler_output, model_runner_output)
        if online and self.channel is not None and self._publish_steps:
            self._record_request_latencies(online)
        return result

    def _online_scheduled(self, scheduler_output) -> list[tuple[str, Any]]:
        out = []
        for req_id in self.access.scheduled_tokens(scheduler_output):
            req = self.access.request(req_id)
            if req is not None and self.access.priority(req) < _OFFLINE_PRIORITY:
                out.append((req_id, req))
        return out

    def _record_request_latencies(self, online: list[tuple[str, Any]]) -> None:
        """First-token and finish events of the online requests in the step just answered."""
        a = self.access
        now_s = time.time()
        try:
            for req_id, req in online:
                num_out = a.num_output_tokens(req)
                if num_out >= 1 and req_id not in self._first_token_s:
                    self._first_token_s[req_id] = now_s
                    self.channel.append_latency(now_s, ttft_ms=(now_s - a.arrival_time_s(req)) * 1000.0)
                if a.is_finished(req):
                    first = self._first_token_s.pop(req_id, None)
                    if first is not None and num_out > 1:
                        self.channel.append_latency(now_s, tpot_ms=(now_s - first) * 1000.0 / (num_out - 1))
            running = [running_tpot_ms(now_s, self._first_token_s.get(req_id), a.num_output_tokens(req)) or 0.0
                       for req_id, req in online if not a.is_finished(req)]
            self.channel.set_counters(online_running_tpot_max_ms=max(running, default=0.0))
            if len(self._first_token_s) > 4 * max(1, a.max_num_seqs):
                # Requests aborted before they finished never come back here: forget them.
                self._first_token_s = {k: v for k, v in self._first_token_s.items() if a.request(k) is not None}
        except Exception as err:  # noqa: BLE001 - telemetry must never take the engine down
            log.warning("colocate: request latency record failed (%s); no longer publishing", err)
            self._publish_steps = False

    def _publish(self, record: dict[str, Any]) -> None:
        start = time.perf_counter()
        try:
            record["end_time_s"] = time.time()
            self.channel.append_step(np.fromiter((record[c] for c in RING_COLUMNS), dtype=np.float64,
                                                 count=len(RING_COLUMNS)))
            self.channel.add_counter("num_online_tokens_total", record["num_online_tokens"])
            self.channel.add_counter("num_offline_tokens_total", record["num_offline_tokens"])
            self.channel.add_counter("num_offline_prompt_tokens_total", record["num_offline_prompt_tokens"])
            self.channel.add_counter("num_offline_output_tokens_total", record["num_offline_output_tokens"])
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
        path = os.environ.get(ENV_TELEMETRY_PATH)
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
