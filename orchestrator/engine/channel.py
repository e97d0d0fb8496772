"""Shared memory between a replica (the Ray Serve actor) and its vLLM EngineCore process.

The engine's scheduler runs in a process of its own, stepping every few milliseconds; asking it
anything over RPC would cost more than a step. So the two share one small memory-mapped file:

- the **budget** (written by the replica, read by the scheduler at every step): per count of
  online requests in the engine, the most offline sequences that may run and the most offline
  tokens per step, valid until a wall-clock deadline after which the scheduler falls back to a
  safe budget on its own (the controller went silent);
- the **engine counters** (written by the scheduler): online/offline requests running, waiting
  and paused, offline preemptions, throttled steps;
- the **step ring** (written by the scheduler): one row per step with the aggregates of
  `latency_model.schema` and the step's end time, read by the replica for the controller and by
  `colocate profile`;
- the **latency ring** (written by the scheduler): one row per online request event, its time to
  first token when the first token is produced and its time per output token when it finishes,
  measured in the engine (the same for streamed and non-streamed replies).

Each field has exactly one writer; float64 slots are written whole, so a reader sees either the
old or the new value. Ring rows are written before the row count is advanced. The budget tables
are many slots, so they are guarded by a sequence lock: the writer makes the sequence odd, writes,
and makes it even again; a reader that sees an odd or changed sequence reads again, and after a
few tries uses the fallback budget, so a half-written table is never applied. (Python's stores
reach memory in program order on x86-64, the platform tested here; the sequence check is what a
seqlock needs on such a total-store-order machine.)
"""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from latency_model.schema import STEP_SCHEMA
from orchestrator.engine.budget import TABLE_SIZE, UNLIMITED, OfflineBudget
from orchestrator.engine.shm import process_alive
from orchestrator.names import ENV_ENGINE_CHANNEL

MAGIC = 0xC0C0CA7E
LAYOUT_VERSION = 5

RING_COLUMNS: tuple[str, ...] = (*[f.name for f in STEP_SCHEMA], "end_time_s", "num_online_reqs")
DEFAULT_RING_CAPACITY = 8192
LATENCY_COLUMNS: tuple[str, ...] = ("time_s", "ttft_ms", "tpot_ms")
"""One row per online request event: ttft_ms or tpot_ms is set, the other is NaN."""
LATENCY_RING_CAPACITY = 4096
_SEQLOCK_TRIES = 3

# Header slots (float64 each).
_MAGIC, _VERSION, _BUDGET_SEQ, _VALID_UNTIL, _FALLBACK_SEQS, _FALLBACK_TOKENS, _RING_CAP, _RING_COUNT = range(8)
COUNTER_NAMES: tuple[str, ...] = (
    "num_online_running", "num_online_waiting", "num_offline_running", "num_offline_waiting",
    "num_offline_paused", "num_offline_preempted_total", "num_throttled_steps", "num_fallback_steps",
    "online_context_tokens", "offline_context_tokens", "num_online_tokens_total", "num_offline_tokens_total",
    "num_steps_total", "step_time_s_total", "max_num_seqs", "online_running_tpot_max_ms",
    "num_offline_prompt_tokens_total", "num_offline_output_tokens_total", "num_guard_promotions",
    "num_chat_preempted_total",
)
_COUNTERS = 8
_SEQS_TABLE = _COUNTERS + len(COUNTER_NAMES)
_TOKENS_TABLE = _SEQS_TABLE + TABLE_SIZE
_LATENCY_COUNT = _TOKENS_TABLE + TABLE_SIZE
_HEADER_SLOTS = _LATENCY_COUNT + 1


CHANNEL_PREFIX = "colocate-engine-"


def channel_dir() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() else Path(tempfile.gettempdir())


def sweep_stale_channels(directory: Path | None = None) -> list[Path]:
    """Remove channel files whose creating replica process is gone. A replica killed with its
    cluster never runs its cleanup; its file is named after its pid, so a later replica or
    `colocate down` can tell it is stale."""
    removed = []
    for path in (directory or channel_dir()).glob(f"{CHANNEL_PREFIX}*.chan"):
        pid = path.name[len(CHANNEL_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


class EngineChannel:
    """One mapped channel file. `create` on the replica side, `open` in the engine process."""

    def __init__(self, path: Path, mm: mmap.mmap) -> None:
        self.path = path
        self._mm = mm
        self.header = np.ndarray((_HEADER_SLOTS,), dtype=np.float64, buffer=mm, offset=0)
        capacity = int(self.header[_RING_CAP])
        self.ring = np.ndarray((capacity, len(RING_COLUMNS)), dtype=np.float64, buffer=mm,
                               offset=_HEADER_SLOTS * 8)
        self.latency_ring = np.ndarray((LATENCY_RING_CAPACITY, len(LATENCY_COLUMNS)), dtype=np.float64, buffer=mm,
                                       offset=(_HEADER_SLOTS + capacity * len(RING_COLUMNS)) * 8)

    @staticmethod
    def _size(capacity: int) -> int:
        return (_HEADER_SLOTS + capacity * len(RING_COLUMNS) + LATENCY_RING_CAPACITY * len(LATENCY_COLUMNS)) * 8

    @classmethod
    def create(cls, path: str | Path | None = None, *, ring_capacity: int = DEFAULT_RING_CAPACITY,
               fallback: OfflineBudget | None = None) -> EngineChannel:
        if path is None:
            sweep_stale_channels()
            fd, name = tempfile.mkstemp(prefix=f"{CHANNEL_PREFIX}{os.getpid()}-", suffix=".chan",
                                        dir=channel_dir())
            os.close(fd)
            path = name
        p = Path(path)
        size = cls._size(ring_capacity)
        with open(p, "wb") as f:
            f.truncate(size)
        with open(p, "r+b") as f:
            mm = mmap.mmap(f.fileno(), size)
        header = np.ndarray((_HEADER_SLOTS,), dtype=np.float64, buffer=mm, offset=0)
        header[_RING_CAP] = ring_capacity
        header[_VERSION] = LAYOUT_VERSION
        fb = fallback or OfflineBudget.flat(UNLIMITED, UNLIMITED)
        header[_FALLBACK_SEQS], header[_FALLBACK_TOKENS] = fb.max_offline_seqs[0], fb.max_offline_tokens[0]
        header[_MAGIC] = MAGIC
        return cls(p, mm)

    @classmethod
    def open(cls, path: str | Path) -> EngineChannel:
        p = Path(path)
        with open(p, "r+b") as f:
            mm = mmap.mmap(f.fileno(), 0)
        header = np.ndarray((_HEADER_SLOTS,), dtype=np.float64, buffer=mm, offset=0)
        if header[_MAGIC] != MAGIC or header[_VERSION] != LAYOUT_VERSION:
            raise ValueError(f"{p}: not a Colocate engine channel of layout {LAYOUT_VERSION}")
        return cls(p, mm)

    @classmethod
    def from_env(cls) -> EngineChannel | None:
        path = os.environ.get(ENV_ENGINE_CHANNEL)
        return cls.open(path) if path else None

    def close(self, unlink: bool = False) -> None:
        del self.header, self.ring, self.latency_ring
        self._mm.close()
        if unlink:
            self.path.unlink(missing_ok=True)

    # --- budget: replica writes, engine reads ---------------------------------------------

    def write_budget(self, budget: OfflineBudget, valid_for_s: float, now_s: float | None = None) -> None:
        n = len(budget.max_offline_seqs)
        seqs = np.full(TABLE_SIZE, budget.max_offline_seqs[-1], dtype=np.float64)
        toks = np.full(TABLE_SIZE, budget.max_offline_tokens[-1], dtype=np.float64)
        seqs[:n], toks[:n] = budget.max_offline_seqs, budget.max_offline_tokens
        h = self.header
        h[_BUDGET_SEQ] += 1  # odd: a write is in progress
        h[_SEQS_TABLE:_TOKENS_TABLE] = seqs
        h[_TOKENS_TABLE:_LATENCY_COUNT] = toks
        h[_VALID_UNTIL] = (time.time() if now_s is None else now_s) + valid_for_s
        h[_BUDGET_SEQ] += 1  # even: complete

    def set_fallback(self, budget: OfflineBudget) -> None:
        self.header[_FALLBACK_SEQS], self.header[_FALLBACK_TOKENS] = budget.at(0)

    def budget_at(self, num_online: int, now_s: float) -> tuple[int, int, bool]:
        """(max offline seqs, max offline tokens per step, fallback?) for this step."""
        h = self.header
        i = min(num_online, TABLE_SIZE - 1)
        for _ in range(_SEQLOCK_TRIES):
            seq = h[_BUDGET_SEQ]
            if seq == 0:
                break  # never written
            if int(seq) % 2:
                continue  # being written
            seqs, tokens, valid_until = h[_SEQS_TABLE + i], h[_TOKENS_TABLE + i], h[_VALID_UNTIL]
            if h[_BUDGET_SEQ] != seq:
                continue  # written while we read
            if now_s > valid_until:
                break
            return int(seqs), int(tokens), False
        return int(h[_FALLBACK_SEQS]), int(h[_FALLBACK_TOKENS]), True

    def budget_seq(self) -> int:
        """Budgets written so far."""
        return int(self.header[_BUDGET_SEQ]) // 2

    # --- counters and ring: engine writes, replica reads ----------------------------------

    def set_counters(self, **values: float) -> None:
        for name, value in values.items():
            self.header[_COUNTERS + COUNTER_NAMES.index(name)] = value

    def add_counter(self, name: str, delta: float) -> None:
        self.header[_COUNTERS + COUNTER_NAMES.index(name)] += delta

    def counters(self) -> dict[str, float]:
        return {n: float(self.header[_COUNTERS + i]) for i, n in enumerate(COUNTER_NAMES)}

    def append_step(self, row: np.ndarray) -> None:
        count = int(self.header[_RING_COUNT])
        self.ring[count % self.ring.shape[0]] = row
        self.header[_RING_COUNT] = count + 1

    def append_latency(self, time_s: float, *, ttft_ms: float = float("nan"), tpot_ms: float = float("nan")) -> None:
        count = int(self.header[_LATENCY_COUNT])
        self.latency_ring[count % LATENCY_RING_CAPACITY] = (time_s, ttft_ms, tpot_ms)
        self.header[_LATENCY_COUNT] = count + 1

    def latencies_since(self, since: int) -> tuple[np.ndarray, int]:
        """Latency rows appended after event number `since`, and the number to pass next time."""
        return _ring_since(self.latency_ring, int(self.header[_LATENCY_COUNT]), since)

    def num_steps(self) -> int:
        return int(self.header[_RING_COUNT])

    def steps_since(self, since: int) -> tuple[np.ndarray, int]:
        """Rows appended after step number `since` (at most what the ring still holds), and the
        step number to pass next time. Leaves a margin so a row being overwritten is never read."""
        return _ring_since(self.ring, int(self.header[_RING_COUNT]), since)


def _ring_since(ring: np.ndarray, count: int, since: int) -> tuple[np.ndarray, int]:
    """Rows `since`..`count` of a ring (at most what it still holds), leaving a margin so that a
    row being overwritten is never read."""
    capacity = ring.shape[0]
    start = max(since, count - (capacity - 16))
    if start >= count:
        return np.empty((0, ring.shape[1])), count
    idx = np.arange(start, count) % capacity
    return ring[idx].copy(), count


def latency_rows_to_columns(rows: np.ndarray) -> dict[str, np.ndarray]:
    return {name: rows[:, i] for i, name in enumerate(LATENCY_COLUMNS)}


def rows_to_columns(rows: np.ndarray) -> dict[str, np.ndarray]:
    return {name: rows[:, i] for i, name in enumerate(RING_COLUMNS)}
