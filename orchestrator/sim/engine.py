"""One simulated replica: vLLM's scheduling rules in miniature, under the production enforcement.

`SimEngine` keeps vLLM v1's queues and rules as they matter to co-location (priority policy):
running requests are scheduled first, in list order, each taking its decode token or a prefill
chunk (chunked prefill) within the step's token budget (`max_num_batched_tokens`); KV cache blocks
(`block_size` tokens each) are allocated as tokens are scheduled, and when none are left the
lowest-priority, newest running request is preempted (its KV freed, recomputed later); then, if
nothing was preempted, waiting requests are admitted in (priority, arrival) order while sequence
slots (`max_num_seqs`), tokens and blocks last. Prefix caching, speculative decoding and async
scheduling are not modelled.

On top of that runs the very code that runs inside a real engine before each step:
`orchestrator.engine.enforce.BudgetEnforcer.apply` (which plans with
`orchestrator.engine.plan.plan_step`), through the `SchedulerView` protocol this class implements.
Step time comes from a latency model (`predict_ms` over the step's aggregates, the protocol the
controller uses): the trained CPU model or the GPU roofline. The step rows and per-request
latencies it records are what a real engine's telemetry records, and its report is built by the
same `orchestrator.engine.load.LoadWindow`.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from latency_model.batch import offline_counts, step_aggregates
from latency_model.features import featurize
from orchestrator.config import OrderConfig
from orchestrator.engine.budget import OfflineBudget
from orchestrator.engine.enforce import OFFLINE_PRIORITY, BudgetEnforcer, counts_as_counters
from orchestrator.engine.load import CALIBRATION_COLUMNS, LoadWindow, running_tpot_ms
from orchestrator.engine.order import LimitedPreemption, WaitingGuard


@dataclass(eq=False)
class SimRequest:
    request_id: str
    priority: int
    arrival_s: float
    num_prompt_tokens: int
    max_tokens: int
    job: str | None = None
    num_computed_tokens: int = 0
    num_output_tokens: int = 0
    num_blocks: int = 0
    next_decode_eligible_step: int = 0
    first_token_s: float | None = None
    finished_s: float | None = None
    num_preemptions: int = 0
    prompt_ids: tuple[int, ...] = ()
    client_arrival_s: float | None = None
    """When the client sent it (before any wait at the router); None: `arrival_s`."""
    replica_id: str = ""

    @property
    def is_offline(self) -> bool:
        return self.priority >= OFFLINE_PRIORITY

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def tpot_ms(self) -> float | None:
        if self.finished_s is None or self.first_token_s is None or self.num_output_tokens <= 1:
            return None
        return (self.finished_s - self.first_token_s) * 1000.0 / (self.num_output_tokens - 1)

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_s is None else (self.first_token_s - self.arrival_s) * 1000.0


@dataclass(frozen=True)
class SimEngineConfig:
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_gpu_blocks: int = 28_000
    long_prefill_token_threshold: int = 0
    max_model_len: int = 4096
    host_overhead_ms: float = 0.0
    """Host time per step outside the forward pass (scheduling, serving), added to every step."""


@dataclass
class _Step:
    """A step in flight: what was scheduled (request -> tokens) and when it ends."""

    scheduled: dict[SimRequest, int]
    record: dict[str, Any]
    end_s: float


@dataclass
class EngineCounters:
    num_online_tokens_total: float = 0.0
    num_offline_tokens_total: float = 0.0
    num_offline_prompt_tokens_total: float = 0.0
    num_offline_output_tokens_total: float = 0.0
    num_steps_total: float = 0.0
    step_time_s_total: float = 0.0
    num_offline_preempted_total: float = 0.0
    num_throttled_steps: float = 0.0
    num_fallback_steps: float = 0.0


class SimEngine:
    """A replica's engine in simulated time. The caller (the cluster loop) adds requests, starts a
    step with `start_step(now)` when the engine is free, and ends it with `finish_step()` at the
    returned end time; `report(now)` is what the replica sends the controller."""

    def __init__(self, replica_id: str, cfg: SimEngineConfig, step_model, *, controlled: bool = True,
                 fallback: OfflineBudget = OfflineBudget.flat(1, 64),
                 offline_policy: str = "fcfs", on_finish: Callable[[SimRequest], None] | None = None,
                 order: OrderConfig | None = None) -> None:
        self.replica_id = replica_id
        self.cfg = cfg
        self.step_model = step_model
        self.controlled = controlled
        self.fallback = fallback
        self.on_finish = on_finish
        self.now_s = 0.0
        self.current_step = 0
        self._running: list[SimRequest] = []
        self._waiting: list[tuple[int, float, int, SimRequest]] = []  # heap on (priority, arrival, seq)
        self._waiting_ids: set[int] = set()
        self._seq = 0
        self._held: list[SimRequest] = []
        self._token_cap = cfg.max_num_batched_tokens
        self._free_blocks = cfg.num_gpu_blocks
        self.budget: OfflineBudget | None = None
        self.budget_valid_until_s = -math.inf
        self.override: OfflineBudget | None = None
        self.in_flight: _Step | None = None
        self.counters = EngineCounters()
        self._counts: dict[str, Any] = {k: 0 for k in (
            "num_online_running", "num_online_waiting", "num_offline_running", "num_offline_waiting",
            "num_offline_paused", "online_context_tokens", "offline_context_tokens")}
        self._step_rows: list[dict[str, Any]] = []
        self._latency_events: list[tuple[float, float, float]] = []
        self.load = LoadWindow()
        self.enforcer = BudgetEnforcer(self, clock=lambda: self.now_s, offline_policy=offline_policy,
                                       wall_clock=lambda: self.now_s)
        self.finished: list[SimRequest] = []
        # Length-aware ordering, as the engine's scheduler runs it: the same per-step pass.
        self.guard = WaitingGuard(order) if order is not None and order.policy != "fcfs" else None
        self.num_guard_promotions = 0
        self.preemption = (LimitedPreemption.from_config(order) if order is not None and order.policy == "srpt"
                           else None)
        self.num_chat_preempted = 0

    # --- the SchedulerView protocol (what BudgetEnforcer sees) --------------------------------

    @property
    def chunk_limit(self) -> int:
        t = self.cfg.long_prefill_token_threshold
        return t if t > 0 else self.cfg.max_num_batched_tokens

    @property
    def max_num_seqs(self) -> int:
        return self.cfg.max_num_seqs

    @property
    def block_size(self) -> int:
        return self.cfg.block_size

    def running(self) -> list:
        return list(self._running)

    def set_running(self, requests: list) -> None:
        self._running = list(requests)

    def waiting(self) -> list:
        return [entry[3] for entry in sorted(self._waiting)]

    def hold_waiting(self, requests: list) -> None:
        held = set(map(id, requests))
        self._waiting = [e for e in self._waiting if id(e[3]) not in held]
        heapq.heapify(self._waiting)
        self._waiting_ids -= held
        self._held.extend(requests)

    def release_waiting(self, requests: list) -> None:
        back = set(map(id, requests))
        self._held = [r for r in self._held if id(r) not in back]
        for r in requests:
            self._push_waiting(r)

    def in_waiting(self, request) -> bool:
        return id(request) in self._waiting_ids

    def step_token_cap(self) -> int:
        return self._token_cap

    def set_step_token_cap(self, num_tokens: int) -> None:
        self._token_cap = num_tokens

    def defer_decode(self, request, until_step: int) -> int:
        old = request.next_decode_eligible_step
        request.next_decode_eligible_step = until_step
        return old

    def restore_decode(self, request, step: int) -> None:
        request.next_decode_eligible_step = step

    def num_free_blocks(self) -> int:
        return self._free_blocks

    def num_total_blocks(self) -> int:
        return self.cfg.num_gpu_blocks

    @staticmethod
    def num_output_tokens(request) -> int:
        return request.num_output_tokens

    def preempt(self, request, now_s: float) -> None:
        self._running.remove(request)
        self._preempt(request)

    @staticmethod
    def priority(request) -> int:
        return request.priority

    @staticmethod
    def arrival_time_s(request) -> float:
        return request.arrival_s

    @staticmethod
    def context_tokens(request) -> int:
        return request.num_computed_tokens

    @staticmethod
    def is_prefilling(request) -> bool:
        return request.num_computed_tokens < request.num_prompt_tokens

    @staticmethod
    def tokens_to_schedule(request, chunk_limit: int) -> int:
        return max(0, min(request.num_tokens - request.num_computed_tokens, chunk_limit))

    @staticmethod
    def tokens_to_admit(request) -> int:
        return request.num_tokens - request.num_computed_tokens

    @staticmethod
    def prompt_token_ids(request):
        return request.prompt_ids

    @staticmethod
    def request_id(request) -> str:
        return request.request_id

    def set_waiting_priority(self, request, priority: int) -> None:
        request.priority = priority
        self._waiting = [(e[3].priority, e[1], e[2], e[3]) for e in self._waiting]
        heapq.heapify(self._waiting)

    # --- requests ------------------------------------------------------------------------------

    def _push_waiting(self, r: SimRequest) -> None:
        self._seq += 1
        heapq.heappush(self._waiting, (r.priority, r.arrival_s, self._seq, r))
        self._waiting_ids.add(id(r))

    def add_request(self, r: SimRequest) -> None:
        r.replica_id = self.replica_id
        if r.client_arrival_s is None:
            r.client_arrival_s = r.arrival_s
        self._push_waiting(r)

    @property
    def num_requests(self) -> int:
        return len(self._running) + len(self._waiting) + len(self._held)

    def num_ongoing(self, offline: bool | None = None) -> int:
        reqs = [*self._running, *(e[3] for e in self._waiting), *self._held]
        return len(reqs) if offline is None else sum(1 for r in reqs if r.is_offline == offline)

    def _preempt(self, r: SimRequest) -> None:
        self._free_blocks += r.num_blocks
        r.num_blocks = 0
        r.num_computed_tokens = 0
        r.num_preemptions += 1
        if r.is_offline:
            self.counters.num_offline_preempted_total += 1
        self._push_waiting(r)

    def _allocate(self, r: SimRequest, num_new_tokens: int) -> bool:
        need = -(-(r.num_computed_tokens + num_new_tokens) // self.cfg.block_size) - r.num_blocks
        if need > self._free_blocks:
            return False
        if need > 0:
            self._free_blocks -= need
            r.num_blocks += need
        return True

    # --- budget (the channel's rule: a budget expires, then the fallback holds) ---------------

    def set_budget(self, budget: OfflineBudget, valid_until_s: float) -> None:
        self.budget, self.budget_valid_until_s = budget, valid_until_s

    def budget_in_force(self, num_online: int, now_s: float) -> tuple[int, int]:
        """The budget row that applies at `now_s` (what `budget_at` applies, without counting)."""
        if self.override is not None:
            return self.override.at(num_online)
        if self.budget is None or now_s > self.budget_valid_until_s:
            return self.fallback.at(num_online)
        return self.budget.at(num_online)

    def budget_at(self, num_online: int) -> tuple[int, int]:
        if self.override is not None:
            return self.override.at(num_online)
        if self.budget is None or self.now_s > self.budget_valid_until_s:
            self.counters.num_fallback_steps += 1
            return self.fallback.at(num_online)
        return self.budget.at(num_online)

    # --- a step ----------------------------------------------------------------------------------

    def _schedule(self) -> dict[SimRequest, int]:
        """vLLM's schedule(), in miniature (see the module docstring)."""
        budget = self._token_cap
        scheduled: dict[SimRequest, int] = {}
        preempted = False
        i = 0
        while i < len(self._running) and budget > 0:
            r = self._running[i]
            if self.current_step < r.next_decode_eligible_step:
                i += 1
                continue
            n = min(self.tokens_to_schedule(r, self.chunk_limit), budget,
                    self.cfg.max_model_len - r.num_computed_tokens)
            if n <= 0:
                i += 1
                continue
            while not self._allocate(r, n):
                victim = max(self._running, key=lambda q: (q.priority, q.arrival_s))
                index = self._running.index(victim)
                del self._running[index]
                if index < i:
                    i -= 1
                if victim in scheduled:
                    budget += scheduled.pop(victim)
                self._preempt(victim)
                preempted = True
                if victim is r:
                    break
            else:
                scheduled[r] = n
                budget -= n
                i += 1
                continue
            break  # the request itself was preempted: nothing more fits
        if not preempted:
            while self._waiting and budget > 0 and len(self._running) < self.cfg.max_num_seqs:
                r = self._waiting[0][3]
                n = min(self.tokens_to_schedule(r, self.chunk_limit), budget)
                # vLLM (scheduler_reserve_full_isl, its default) admits a waiting request only if
                # its whole input fits in the free blocks, not just the first chunk.
                full = -(-min(r.num_tokens, self.cfg.max_model_len) // self.cfg.block_size) - r.num_blocks
                if n <= 0 or full > self._free_blocks or not self._allocate(r, n):
                    break
                heapq.heappop(self._waiting)
                self._waiting_ids.discard(id(r))
                self._running.append(r)
                scheduled[r] = n
                budget -= n
        for r, n in scheduled.items():
            r.num_computed_tokens += n
        return scheduled

    def start_step(self, now_s: float) -> float | None:
        """Plan and schedule a step at `now_s`; its end time, or None when nothing can run."""
        self.now_s = now_s
        if not self._running and not self._waiting:
            return None
        if self.guard is not None:
            self.num_guard_promotions += self.guard.apply(self, now_s)
        if self.preemption is not None:
            self.num_chat_preempted += self.preemption.apply(self, now_s)
        undo = None
        if self.controlled:
            undo, plan, counts = self.enforcer.apply(self.budget_at)
            self._counts = counts_as_counters(counts)
            if counts.throttled:
                self.counters.num_throttled_steps += 1
        try:
            scheduled = self._schedule()
        finally:
            if undo is not None:
                undo()
        if not scheduled:
            return None
        # After a preemption vLLM recomputes prompt and outputs as prefill, and samples only once
        # all of them are back: the prefill runs to max(prompt, tokens - 1), the token comes at
        # the request's whole length.
        batch = [(r.num_computed_tokens - n, n, r.num_prompt_tokens, r.num_tokens, r.is_offline)
                 for r, n in scheduled.items()]
        offline = offline_counts(batch)
        record = {**step_aggregates((c, n, max(p, held - 1)) for c, n, p, held, _ in batch), **offline,
                  "num_online_reqs": len(scheduled) - offline["num_offline_reqs"],
                  "num_online_tokens": sum(scheduled.values()) - offline["num_offline_tokens"],
                  "kv_cache_usage": 1.0 - self._free_blocks / self.cfg.num_gpu_blocks}
        median, _ = self.step_model.predict_ms(featurize({k: np.asarray([v], dtype=np.float64)
                                                         for k, v in record.items()}))
        step_ms = float(median[0]) + self.cfg.host_overhead_ms
        record["step_latency_ms"] = step_ms
        self.in_flight = _Step(scheduled, record, now_s + step_ms / 1000.0)
        return self.in_flight.end_s

    def finish_step(self) -> list[SimRequest]:
        """The step in flight ends: tokens are emitted, finished requests leave. Returns them."""
        step, self.in_flight = self.in_flight, None
        assert step is not None
        self.now_s = end = step.end_s
        self.current_step += 1
        rec = step.record
        c = self.counters
        c.num_online_tokens_total += rec["num_online_tokens"]
        c.num_offline_tokens_total += rec["num_offline_tokens"]
        c.num_offline_prompt_tokens_total += rec["num_offline_prompt_tokens"]
        c.num_offline_output_tokens_total += rec["num_offline_output_tokens"]
        c.num_steps_total += 1
        c.step_time_s_total += rec["step_latency_ms"] / 1000.0
        self._step_rows.append({**rec, "end_time_s": end})
        done = []
        for r in step.scheduled:
            if r.num_computed_tokens < r.num_tokens or r.num_blocks == 0:
                continue  # a chunk short of the prompt (or of a recompute), or preempted since
            r.num_output_tokens += 1
            if r.first_token_s is None:
                r.first_token_s = end
                if not r.is_offline:
                    self._latency_events.append((end, r.ttft_ms, math.nan))
            if r.num_output_tokens >= r.max_tokens or r.num_tokens >= self.cfg.max_model_len:
                r.finished_s = end
                self._running.remove(r)
                self._free_blocks += r.num_blocks
                r.num_blocks = 0
                if not r.is_offline and r.tpot_ms is not None:
                    self._latency_events.append((end, math.nan, r.tpot_ms))
                done.append(r)
        for r in done:
            self.finished.append(r)
            if self.on_finish is not None:
                self.on_finish(r)
        return done

    # --- the report ------------------------------------------------------------------------------

    def _running_tpot_max_ms(self, now_s: float) -> float:
        worst = 0.0
        for r in self._running:
            if not r.is_offline:
                worst = max(worst, running_tpot_ms(now_s, r.first_token_s, r.num_output_tokens) or 0.0)
        return worst

    def report(self, now_s: float) -> dict[str, Any]:
        """What a Serve replica's `load_snapshot()` sends the controller."""
        rows, self._step_rows = self._step_rows, []
        events, self._latency_events = self._latency_events, []
        cols = (*CALIBRATION_COLUMNS, "end_time_s", "num_online_reqs", "kv_cache_usage")
        steps = {c: np.asarray([r[c] for r in rows], dtype=np.float64) for c in dict.fromkeys(cols)}
        lat = {"time_s": [e[0] for e in events], "ttft_ms": [e[1] for e in events], "tpot_ms": [e[2] for e in events]}
        window = self.load.observe(steps, lat, now_s, self._running_tpot_max_ms(now_s))
        c = self.counters
        return {"replica_id": self.replica_id, "reported_at_s": now_s, **self._counts,
                "max_num_seqs": self.cfg.max_num_seqs,
                **{k: getattr(c, k) for k in ("num_offline_preempted_total", "num_throttled_steps",
                                              "num_fallback_steps", "num_online_tokens_total",
                                              "num_offline_tokens_total", "num_offline_prompt_tokens_total",
                                              "num_offline_output_tokens_total", "num_steps_total",
                                              "step_time_s_total")},
                **window}
