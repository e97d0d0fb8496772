"""Length-aware ordering, as data: a request's predicted length becomes its vLLM priority level,
and a starvation guard says when a waiting request must be served by arrival instead.

vLLM's priority scheduler keeps the waiting queue as a heap on (priority, arrival time), so a
priority that grows with the predicted reply length is shortest-predicted-first, with FCFS among
equals, using vLLM's own queue (no fork). Levels are logarithmic (`levels_per_octave` per
doubling of the length): a prediction is only good to a factor, and ordering 101 before 102
tokens would be noise. The level is also how trust enters: `trust` in [0, 1] (from the live
quality monitor, `latency_model.length.online.QualityMonitor`) scales the level, so as
predictions get worse the levels merge and the order tends to FCFS; at trust 0 every request
has level 0 and the queue is exactly FCFS.

Aging: a waiting request's level falls as it waits, by `aging_octaves_per_service` octaves per
typical request's service time (`aged_level`): pure shortest-first starves long requests, and in
the length bench it raised chat p99 to 1.8x FCFS's with the guard alone.

The guard (SSJF's): a waiting request is promoted to level 0 (served by arrival among the
promoted) once it has waited more than `max_wait_s`, or more than `wait_factor` times its own
service time. Service time is counted in engine steps (a decode step yields one token, so a
reply of n tokens needs about n steps), which makes the guard independent of the host's speed.

Pure functions; the engine's scheduler applies them (`orchestrator.engine.scheduler`) and a
simulator can call the same ones.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Container, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latency_model.length.predictor import expected_remaining, load_residuals
from orchestrator.config import OrderConfig
from orchestrator.request_class import NUM_LEVELS, RequestClass, level_of, vllm_priority

log = logging.getLogger(__name__)

MAX_LEVEL = NUM_LEVELS - 1
"""Levels stay below the offline class's priority base (orchestrator.request_class)."""
PREFIX_DEPTH_TOKENS = 1024
"""Prompt tokens compared by the prefix-sharing order (a shared header longer than this is
still grouped: only the order inside the group is then by arrival)."""


def priority_level(predicted_tokens: float | None, trust: float, cfg: OrderConfig) -> int:
    """The level (0 = first) of a request predicted to produce `predicted_tokens`; 0 when
    ordering is FCFS, there is no prediction, or trust is 0."""
    if cfg.policy == "fcfs" or predicted_tokens is None or trust <= 0.0:
        return 0
    level = math.floor(min(trust, 1.0) * cfg.levels_per_octave * math.log2(1.0 + max(predicted_tokens, 0.0)))
    return int(min(max(level, 0), MAX_LEVEL))


def tokens_of_level(level: int, cfg: OrderConfig) -> float:
    """The shortest predicted length with this level at full trust (a lower bound on the
    prediction behind a level, so a guard computed from it fires early, never late)."""
    return 2.0 ** (level / cfg.levels_per_octave) - 1.0


def aged_level(level: int, waited_steps: int, cfg: OrderConfig, reference_tokens: float) -> int:
    """The level of a waiting request of `level` after `waited_steps` steps in the queue: every
    waiting request drops `aging_octaves_per_service` octaves per `reference_tokens` steps waited,
    where the reference is a typical request's predicted length (the engine passes the median of
    recent arrivals). The same rate for all: a request predicted 10x longer than the typical one
    waits about log2(10) = 3.3 typical service times longer before it competes with fresh ones,
    which bounds the tail. (Aging each request by its own service time, as SSJF's guard counts,
    let long requests age so slowly that the length bench's p99 rose to 1.5-1.9x FCFS's.)
    Counted in engine steps: no host speed enters. 0 turns aging off (the guard alone)."""
    if level <= 0 or cfg.aging_octaves_per_service <= 0:
        return max(level, 0)
    drop = math.floor(cfg.levels_per_octave * cfg.aging_octaves_per_service * waited_steps
                      / max(reference_tokens, 1.0))
    return max(level - drop, 0)


def guard_due(level: int, waited_s: float, waited_steps: int, cfg: OrderConfig) -> bool:
    """Whether a waiting request of this level has waited long enough to be served by arrival."""
    if level <= 0:
        return False
    if waited_s > cfg.max_wait_s:
        return True
    return waited_steps > cfg.wait_factor * max(tokens_of_level(level, cfg), 1.0)


def prefix_sharing_order(prompts: list, arrivals_s: list[float], now_s: float, max_wait_s: float,
                         depth: int = PREFIX_DEPTH_TOKENS) -> list[int]:
    """Admission order of waiting offline requests that groups those sharing a prompt prefix
    (HyGen's prefix-sharing maximisation): indices into `prompts` (token id sequences).

    Sorting the prompts' first `depth` tokens lexicographically is the depth-first walk of their
    prefix trie: requests that share a prefix are contiguous, and the longer the shared prefix
    the closer they sit, so the first of a group computes the prefix and vLLM's prefix cache
    serves it to the rest while its blocks are still cached. A freshness guard comes first:
    requests that have waited `max_wait_s` or more are admitted by arrival, so a prompt that
    sorts last is not starved by a stream of earlier-sorting ones."""
    stale = [i for i, a in enumerate(arrivals_s) if now_s - a >= max_wait_s]
    fresh = [i for i, a in enumerate(arrivals_s) if now_s - a < max_wait_s]
    stale.sort(key=lambda i: arrivals_s[i])
    fresh.sort(key=lambda i: (tuple(prompts[i][:depth]), arrivals_s[i]))
    return stale + fresh


@dataclass(frozen=True)
class RunningChat:
    """What limited preemption reads of a running chat request."""

    request_id: str
    predicted_tokens: float
    """Its predicted reply length at admission (the level it arrived with, decoded)."""
    generated_tokens: int
    kv_blocks: int
    remaining_tokens: float | None = None
    """Its refreshed prediction: the expected tokens left given those generated so far (TRAIL's);
    None: `predicted_tokens - generated_tokens`."""

    @property
    def tokens_left(self) -> float:
        if self.remaining_tokens is not None:
            return self.remaining_tokens
        return self.predicted_tokens - self.generated_tokens


def preemption_victim(wanted_tokens: float, running: Sequence[RunningChat], *, slot_free: bool, free_blocks: int,
                      needed_blocks: int, total_blocks: int, cfg: OrderConfig,
                      preempted_before: Container[str] = ()) -> str | None:
    """The running chat request to preempt this step for the most urgent waiting one (predicted
    to produce `wanted_tokens`, from the level it arrived with), or None (`srpt`: shortest
    remaining predicted first with limited preemption, TRAIL's).

    Only when the waiting request finds no room (no slot, or fewer than `needed_blocks` of KV
    among `free_blocks`, which count what offline work holds: the budget's enforcement preempts
    that first), only a victim whose own blocks then make it fit, and only one early in its
    run: it has produced at most `preempt_max_progress` of its predicted reply and holds at
    most `preempt_max_kv_share` of the KV blocks, so what is thrown away (its KV, recomputed
    later) is small; near completion a request is left to finish. The victim is the one with
    the most predicted tokens left, and only if that is `preempt_ratio` times the waiting
    request's predicted length. A request is preempted at most once (no ping-pong). What a
    request has left is its refreshed prediction where the caller gives one
    (`RunningChat.remaining_tokens`), so `wanted_tokens` should then be the same expectation
    taken before any token (`LimitedPreemption` passes both).

    Predictions are decoded from levels, which trust scales down (`priority_level`): under
    trust < 1 they read short, so fewer requests qualify; at trust 0 every level is 0, a
    waiting request with level 0 (no prediction) preempts nothing."""
    if cfg.policy != "srpt" or wanted_tokens <= 0.0:
        return None
    if slot_free and free_blocks >= needed_blocks:
        return None
    victim, most_left = None, cfg.preempt_ratio * (wanted_tokens + 1.0)
    for r in running:
        if r.request_id in preempted_before:
            continue
        if r.generated_tokens > cfg.preempt_max_progress * r.predicted_tokens:
            continue
        if r.kv_blocks > cfg.preempt_max_kv_share * total_blocks or free_blocks + r.kv_blocks < needed_blocks:
            continue
        left = r.tokens_left
        if left > most_left:
            victim, most_left = r.request_id, left
    return victim


class WaitingGuard:
    """The per-step pass of length-aware ordering over the waiting queue: waiting chat requests
    age (their level falls as they wait) and those past their guard are promoted to level 0.
    The engine's scheduler runs it on vLLM's queue (through `SchedulerAccess`) and the simulator
    on its own; `view` needs `current_step`, `waiting()`, `priority(r)`, `request_id(r)`,
    `arrival_time_s(r)` and `set_waiting_priority(r, priority)`."""

    def __init__(self, cfg: OrderConfig) -> None:
        self.cfg = cfg
        self.first_waiting_step: dict[str, tuple[int, int]] = {}  # id -> (first step waiting, level then)
        self.recent_levels: collections.deque[int] = collections.deque(maxlen=256)

    def reference_tokens(self) -> float:
        """A typical request's predicted length: the median level of recent arrivals, decoded."""
        levels = sorted(self.recent_levels)
        return tokens_of_level(levels[len(levels) // 2], self.cfg) if levels else 1.0

    def apply(self, view, now_s: float) -> int:
        """Age and promote; returns how many requests the guard promoted this step."""
        offline = vllm_priority(RequestClass.OFFLINE)
        step, promoted = view.current_step, 0
        seen: dict[str, tuple[int, int]] = {}
        for r in view.waiting():
            p = view.priority(r)
            if p >= offline or level_of(p) == 0:
                continue
            rid = view.request_id(r)
            if rid not in self.first_waiting_step:
                self.recent_levels.append(level_of(p))
            first, level = seen[rid] = self.first_waiting_step.get(rid, (step, level_of(p)))
            if guard_due(level, now_s - view.arrival_time_s(r), step - first, self.cfg):
                view.set_waiting_priority(r, vllm_priority(RequestClass.ONLINE))
                seen.pop(rid)
                promoted += 1
                continue
            aged = aged_level(level, step - first, self.cfg, self.reference_tokens())
            if aged < level_of(p):
                view.set_waiting_priority(r, vllm_priority(RequestClass.ONLINE, aged))
        self.first_waiting_step = seen
        return promoted


class LimitedPreemption:
    """The per-step pass of `srpt` over the engine (`preemption_victim` on what the scheduler
    holds): remembers each chat request's level at arrival (its prediction; aging and the guard
    change the level it waits at, not what it was predicted to need) and which were preempted.
    `view` is the scheduler's (`SchedulerAccess`): `waiting()`, `running()`, `priority(r)`,
    `request_id(r)`, `arrival_time_s(r)`, `context_tokens(r)`, `num_output_tokens(r)`,
    `tokens_to_admit(r)`, `block_size`, `max_num_seqs`, `num_free_blocks()`,
    `num_total_blocks()`, `preempt(r, now_s)`.

    With the predictor's validation `residuals` (log space, as `latency_model.length.predictor`
    keeps them) the tokens a running request has left are refreshed from what it has generated:
    E[L - g | L > g] over the prediction's distribution (TRAIL's refreshed prediction), so a
    request that has outrun a short prediction is no longer counted as nearly done, and one
    whose distribution says it is likely long has more left than its median says. The waiting
    request's need is the same expectation at g = 0. Without residuals: prediction minus
    tokens generated."""

    def __init__(self, cfg: OrderConfig, residuals: np.ndarray | None = None) -> None:
        self.cfg = cfg
        self.residuals = None if residuals is None or not len(residuals) else np.asarray(residuals, dtype=np.float64)
        self.levels: dict[str, int] = {}
        self.preempted: set[str] = set()

    @classmethod
    def from_config(cls, cfg: OrderConfig) -> LimitedPreemption:
        """The pass with the residuals of the predictor at `cfg.predictor_path` (the replica sends
        the path made absolute); without them, unrefreshed predictions, logged."""
        residuals = None
        if cfg.predictor_path:
            try:
                residuals = load_residuals(Path(cfg.predictor_path))
            except Exception as exc:  # noqa: BLE001 - a missing artifact must not take the engine down
                log.warning("colocate: srpt without refreshed predictions (%s: %s)", cfg.predictor_path, exc)
        return cls(cfg, residuals)

    def _expected_left(self, predicted: Sequence[float], generated: Sequence[int]) -> list[float] | None:
        if self.residuals is None or not len(predicted):
            return None
        return expected_remaining(np.log1p(np.asarray(predicted, dtype=np.float64)), self.residuals,
                                  generated).tolist()

    def apply(self, view, now_s: float) -> int:
        """Preempt at most one running chat request; returns how many were (0 or 1)."""
        offline = vllm_priority(RequestClass.OFFLINE)
        waiting = [r for r in view.waiting() if view.priority(r) < offline]
        running = view.running()
        chat = [r for r in running if view.priority(r) < offline]
        for r in waiting:
            self.levels.setdefault(view.request_id(r), level_of(view.priority(r)))
        live = {view.request_id(r) for r in waiting} | {view.request_id(r) for r in chat}
        if len(self.levels) > len(live):
            self.levels = {k: v for k, v in self.levels.items() if k in live}
        self.preempted &= live
        if not waiting or not chat:
            return 0
        size = view.block_size
        # The request vLLM admits next (its level now, aged or promoted), and what it was
        # predicted to need (the level it arrived with).
        head = min(waiting, key=lambda r: (view.priority(r), view.arrival_time_s(r)))
        # Offline work counts as room: the budget's enforcement preempts it for chat first.
        offline_blocks = sum(-(-view.context_tokens(r) // size) for r in running if view.priority(r) >= offline)
        candidates = [RunningChat(view.request_id(r),
                                  tokens_of_level(self.levels.get(view.request_id(r), level_of(view.priority(r))), self.cfg),
                                  view.num_output_tokens(r), -(-view.context_tokens(r) // size)) for r in chat]
        wanted = tokens_of_level(self.levels[view.request_id(head)], self.cfg)
        refreshed = self._expected_left([c.predicted_tokens for c in candidates] + [wanted],
                                        [c.generated_tokens for c in candidates] + [0])
        if refreshed is not None:
            candidates = [RunningChat(c.request_id, c.predicted_tokens, c.generated_tokens, c.kv_blocks, left)
                          for c, left in zip(candidates, refreshed)]
            # A level-0 head has no prediction: it stays 0 (it preempts nothing).
            wanted = refreshed[-1] if wanted > 0 else 0.0
        victim = preemption_victim(wanted, candidates,
                                   slot_free=view.max_num_seqs - len(chat) >= 1,
                                   free_blocks=view.num_free_blocks() + offline_blocks,
                                   needed_blocks=-(-view.tokens_to_admit(head) // size) + 1,
                                   total_blocks=view.num_total_blocks(), cfg=self.cfg,
                                   preempted_before=self.preempted)
        if victim is None:
            return 0
        view.preempt(next(r for r in chat if view.request_id(r) == victim), now_s)
        self.preempted.add(victim)
        return 1
