"""A discrete-event simulation of N replicas, the controller and batch jobs, in simulated time.

Every decision is production code: each replica's step is planned by the engine's
`BudgetEnforcer` (`SimEngine`), the controller is `ControllerCore` itself (its `tick`: observe,
`policy.decide`, act, with its override for static caps; its live-model refit on this clock), and
batch jobs take their in-flight allowance from `control.sharing.allowance` over the total the
controller sets. What is modelled rather than run: the step time (a latency model), vLLM's
scheduler (`SimEngine`), Serve's routing (power of two choices on ongoing requests, its default
request router), and the network (a fixed client-side overhead on TTFT, zero by default).

Events, in time order (ties by insertion): a chat arrival, a step's end, a replica's report (every
`report_period_s`; the reply carries its budget), a controller tick (every `period_s`), a job's
heartbeat (its allowance), and a sample for the time series. An engine that is idle (nothing to
run, or everything paused) starts its next step at the next event that concerns it.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.control.reply import remaining_validity_s, reply_budget
from orchestrator.control.routing import offline_room, rank_for_offline, rank_for_online
from orchestrator.control.sharing import allowance
from orchestrator.names import MAX_ONGOING_REQUESTS
from orchestrator.request_class import RequestClass, vllm_priority
from orchestrator.sim.engine import SimEngine, SimRequest

ONLINE_PRIORITY = vllm_priority(RequestClass.ONLINE)
OFFLINE_PRIORITY = vllm_priority(RequestClass.OFFLINE)


@dataclass(frozen=True)
class ChatRequest:
    arrival_s: float
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass
class SimJob:
    """A batch job driver (`jobs.batch`): keeps up to its allowance of requests in flight."""

    name: str
    requests: list[tuple[int, int]]
    """(prompt tokens, output tokens), in submission order."""
    default_cap: int = 64
    weight: float = 1.0
    max_cap: int | None = None
    allowed: int = 0
    next_index: int = 0
    in_flight: int = 0
    done: int = 0
    start_s: float = 0.0
    finished_s: float | None = None

    def __post_init__(self) -> None:
        self.allowed = self.default_cap

    @property
    def total(self) -> int:
        return len(self.requests)


@dataclass
class ClusterTimings:
    report_period_s: float = 0.1
    heartbeat_s: float = 2.0
    """`jobs.batch --progress-interval-s` default: how often a job refreshes its allowance."""
    sample_period_s: float = 0.5
    client_overhead_ms: float = 0.0
    """Added to every chat request's TTFT as its client saw it (HTTP, proxy, serialization)."""


@dataclass
class ChatOutcome:
    arrival_s: float
    ttft_s: float | None
    tpot_s: float | None
    num_output_tokens: int
    ok: bool = True
    replica: str = ""


@dataclass
class SimCluster:
    engines: list[SimEngine]
    controller: Any | None
    """A `ControllerCore` (clock = this simulation's), or None: no controller (engines on their fallback)."""
    timings: ClusterTimings = field(default_factory=ClusterTimings)
    seed: int = 0
    refit: bool = True
    job_policy: str = "weighted"
    chat_priority: Callable[[ChatRequest], int] | None = None
    """A chat request's vLLM priority (its length-ordering level); None: FCFS (level 0)."""
    max_ongoing_requests: int = MAX_ONGOING_REQUESTS
    """Serve's per-replica cap on requests in flight; the rest wait at the router, in arrival
    order whatever their class (a chat request behind a batch job's excess waits there)."""
    offline_routing: str = "serve"
    """`serve`: offline requests routed like chat; `room`: to the replica with the most offline
    room, from stats published every `routing_stats_period_s` (control.routing, as
    orchestrator.serving.router does)."""
    routing_stats_period_s: float = 1.0
    on_progress: Callable[[float], None] | None = None

    def __post_init__(self) -> None:
        self.now_s = 0.0
        self._events: list[tuple[float, int, str, Any]] = []
        self._seq = itertools.count()
        self._rng = random.Random(self.seed)
        self.jobs: list[SimJob] = []
        self._job_rows: dict[str, dict[str, Any]] = {}
        self._total_budget: int | None = None
        self.chat: list[tuple[ChatRequest, SimRequest]] = []
        self.samples: list[dict[str, Any]] = []
        self._refit_period_s = None
        for e in self.engines:
            e.on_finish = self._finished
        self._by_id = {e.replica_id: e for e in self.engines}
        self._router_queue: collections.deque[SimRequest] = collections.deque()
        self._deferred_wakes: set[str] | None = None
        self.tick_wall_ms: list[float] = []
        """Host time of each controller tick (observe, decide, act, record): what one tick of
        the production controller costs at this fleet size."""
        self.max_router_queue = 0
        if self.controller is not None:
            self.controller._send_admission_total = self._set_total
            for i, e in enumerate(self.engines):
                # Replicas report out of phase, as independent Serve replicas do.
                self._push(self.timings.report_period_s * (i + 1) / len(self.engines), "report", e)
            self._push(self.controller.period_s, "tick", None)
            if self.refit and self.controller.fitter is not None:
                self._refit_period_s = self.controller.refit_period_s
                self._push(self._refit_period_s, "refit", None)
        self._push(0.0, "sample", None)
        self._room: dict[str, int] = {}
        self._budget: dict[str, int] = {}
        self._online: dict[str, int] = {}
        self._online_sent_since: collections.Counter[str] = collections.Counter()
        self._sent_since: collections.Counter[str] = collections.Counter()
        if self.offline_routing == "room":
            self._push(0.0, "routing_stats", None)

    # --- inputs --------------------------------------------------------------------------------

    def add_chat(self, requests: list[ChatRequest], offset_s: float = 0.0) -> None:
        for r in requests:
            self._push(offset_s + r.arrival_s, "arrival", r)

    def add_job(self, job: SimJob, at_s: float = 0.0) -> None:
        self._push(at_s, "job_start", job)

    def _set_total(self, total: int) -> None:
        self._total_budget = total

    # --- the loop ------------------------------------------------------------------------------

    def _push(self, t: float, kind: str, data: Any) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, data))

    def run(self, until_s: float) -> None:
        """Process every event up to `until_s` (simulated seconds)."""
        last_progress = -math.inf
        while self._events and self._events[0][0] <= until_s:
            t, _, kind, data = heapq.heappop(self._events)
            self.now_s = t
            getattr(self, f"_on_{kind}")(data)
            if self.on_progress is not None and t - last_progress >= 10.0:
                last_progress = t
                self.on_progress(t)
        self.now_s = until_s

    def _wake(self, e: SimEngine) -> None:
        if e.in_flight is None:
            end = e.start_step(self.now_s)
            if end is not None:
                self._push(end, "step_end", e)

    def _route(self, req: SimRequest) -> SimEngine | None:
        """Serve's default routing: two replicas at random among those under
        `max_ongoing_requests`, the one with fewer ongoing requests; None when all are full. With
        `offline_routing: room`, an offline request goes to the free replica with the most room and
        chat to the one of two with less chat, as the Serve request router does (control.routing)."""
        free = [e for e in self.engines if e.num_requests < self.max_ongoing_requests]
        if req.is_offline and self.offline_routing == "room" and free:
            [top], *_ = rank_for_offline([e.replica_id for e in free], self._room, self._sent_since, self._rng,
                                        self._budget)
            self._sent_since[top] += 1
            return self._by_id[top]
        if len(free) <= 1:
            return free[0] if free else None
        if self.offline_routing == "room":  # chat: two choices on chat load (control.routing)
            ranks = rank_for_online([e.replica_id for e in free], self._online, self._online_sent_since, self._rng)
            if len(ranks) > 1:
                top = ranks[0][0]
                self._online_sent_since[top] += 1
                return self._by_id[top]
            a, b = (self._by_id[rid] for rid in ranks[0])
        else:
            a, b = self._rng.sample(free, 2)
        return a if a.num_requests <= b.num_requests else b

    def _submit(self, req: SimRequest) -> SimEngine | None:
        """Hand a request to a replica now, or queue it at the router (FIFO)."""
        e = None if self._router_queue else self._route(req)
        if e is None:
            self._router_queue.append(req)
            self.max_router_queue = max(self.max_router_queue, len(self._router_queue))
            return None
        req.arrival_s = self.now_s  # vLLM's arrival time is when the replica's front end got it
        e.add_request(req)
        return e

    def _drain_router(self) -> None:
        while self._router_queue:
            e = self._route(self._router_queue[0])
            if e is None:
                return
            req = self._router_queue.popleft()
            req.arrival_s = self.now_s
            e.add_request(req)
            self._wake(e)

    def _on_arrival(self, r: ChatRequest) -> None:
        priority = ONLINE_PRIORITY if self.chat_priority is None else self.chat_priority(r)
        req = SimRequest(f"chat-{len(self.chat)}", priority, self.now_s, r.num_prompt_tokens,
                         max(1, r.num_output_tokens), client_arrival_s=self.now_s)
        self.chat.append((r, req))
        e = self._submit(req)
        if e is not None:
            self._wake(e)

    def _on_step_end(self, e: SimEngine) -> None:
        # Engines woken by what finished here (a job's next requests) start after the router
        # queue has been drained: a chat request waiting there must not miss their next step.
        self._deferred_wakes = set()
        try:
            if e.finish_step():
                self._drain_router()
        finally:
            wakes, self._deferred_wakes = self._deferred_wakes, None
        self._wake(e)
        for rid in wakes:
            self._wake(self._by_id[rid])

    def _on_report(self, e: SimEngine) -> None:
        c = self.controller
        reply = c.receive({**e.report(self.now_s), "max_ongoing_requests": self.max_ongoing_requests})
        if reply is not None:
            valid_for_s = remaining_validity_s(reply, 0.0)
            if valid_for_s > 0:
                e.set_budget(reply_budget(reply), self.now_s + valid_for_s)
        self._push(self.now_s + self.timings.report_period_s, "report", e)
        self._wake(e)

    def _on_tick(self, _: Any) -> None:
        started = time.perf_counter()
        self.controller.tick()
        self.tick_wall_ms.append((time.perf_counter() - started) * 1000.0)
        self._push(self.now_s + self.controller.period_s, "tick", None)

    def _on_routing_stats(self, _: Any) -> None:
        """Every replica publishes its offline room (Serve's routing stats); the router's own
        counts since the last publication start again."""
        for e in self.engines:
            seqs, _ = e.budget_in_force(e.num_ongoing(offline=False), self.now_s)
            self._room[e.replica_id] = offline_room(seqs, e.num_ongoing(offline=True))
            self._budget[e.replica_id] = seqs
            self._online[e.replica_id] = e.num_ongoing(offline=False)
        self._sent_since.clear()
        self._online_sent_since.clear()
        self._push(self.now_s + self.routing_stats_period_s, "routing_stats", None)

    def _on_refit(self, _: Any) -> None:
        # The production loop refits in a worker thread while ticks go on; here a refit is
        # instantaneous in simulated time (the model in force changes at this instant).
        self._refit_period_s = self.controller.refit_once(self._refit_period_s)
        self._push(self.now_s + self._refit_period_s, "refit", None)

    def _on_sample(self, _: Any) -> None:
        for e in self.engines:
            held_offline = e.num_ongoing(offline=True)
            c = e.counters
            seqs, _ = e.budget_in_force(e.num_ongoing(offline=False), self.now_s)
            self.samples.append({
                "t": self.now_s, "replica_id": e.replica_id, "online_requests": e.num_ongoing(offline=False),
                "offline_running": held_offline, "offline_waiting": 0, "offline_budget_seqs": seqs,
                "num_offline_tokens_total": c.num_offline_tokens_total,
                "num_offline_output_tokens_total": c.num_offline_output_tokens_total,
                "num_offline_prompt_tokens_total": c.num_offline_prompt_tokens_total,
                "num_online_tokens_total": c.num_online_tokens_total, "step_time_s_total": c.step_time_s_total,
                "num_offline_preempted_total": c.num_offline_preempted_total})
        self._push(self.now_s + self.timings.sample_period_s, "sample", None)

    # --- batch jobs ----------------------------------------------------------------------------

    def _on_job_start(self, job: SimJob) -> None:
        job.start_s = self.now_s
        self.jobs.append(job)
        self._on_heartbeat(job)

    def _on_heartbeat(self, job: SimJob) -> None:
        self._job_rows[job.name] = {"weight": job.weight, "default_cap": job.default_cap, "max_cap": job.max_cap,
                                    "seen_s": self.now_s, "total": job.total, "done": job.done,
                                    "finished": job.finished_s is not None}
        job.allowed = allowance(self._job_rows, job.name, self.now_s, self._total_budget, self.job_policy)
        self._dispatch(job)
        if job.finished_s is None:
            self._push(self.now_s + self.timings.heartbeat_s, "heartbeat", job)

    def _dispatch(self, job: SimJob) -> None:
        woken = set()
        while job.next_index < job.total and job.in_flight < max(job.allowed, 1):
            prompt, output = job.requests[job.next_index]
            e = self._submit(SimRequest(f"{job.name}-{job.next_index}", OFFLINE_PRIORITY, self.now_s, prompt,
                                        max(1, output), job=job.name))
            job.next_index += 1
            job.in_flight += 1
            if e is not None:
                woken.add(e.replica_id)
        for rid in woken:
            if self._deferred_wakes is not None:
                self._deferred_wakes.add(rid)
            else:
                self._wake(self._by_id[rid])

    def _finished(self, r: SimRequest) -> None:
        if r.job is None:
            return
        job = next(j for j in self.jobs if j.name == r.job)
        job.in_flight -= 1
        job.done += 1
        if job.done >= job.total:
            job.finished_s = self.now_s
            # Its last heartbeat says so at once (jobs.batch sends a final one).
            self._job_rows[job.name] = {**self._job_rows.get(job.name, {}), "done": job.done, "finished": True,
                                        "seen_s": self.now_s}
        else:
            self._dispatch(job)

    # --- results -------------------------------------------------------------------------------

    def chat_outcomes(self, since_s: float = -math.inf, until_s: float = math.inf) -> list[ChatOutcome]:
        """Chat requests that arrived in [since_s, until_s): unfinished ones count as failed."""
        out = []
        overhead_s = self.timings.client_overhead_ms / 1000.0
        for _spec, req in self.chat:
            if not since_s <= req.client_arrival_s < until_s:
                continue
            ok = req.finished_s is not None
            ttft = None if req.first_token_s is None else req.first_token_s - req.client_arrival_s + overhead_s
            tpot = None if req.tpot_ms is None else req.tpot_ms / 1000.0
            out.append(ChatOutcome(req.client_arrival_s, ttft, tpot, req.num_output_tokens, ok, req.replica_id))
        return out

