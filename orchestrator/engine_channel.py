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
  `profiler.schema` and the step's end time, read by the replica for the controller and by
  `colocate profile`.

Each field has exactly one writer; float64 slots are written whole, so a reader sees either the
old or the new value. Ring rows are written before the row count is advanced.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from profiler.schema import STEP_SCHEMA

CHANNEL_ENV = "COLOCATE_ENGINE_CHANNEL"
MAGIC = 0xC0C0CA7E
LAYOUT_VERSION = 2
TABLE_SIZE = 64
"""Budget entries by online request count; counts beyond the table use its last entry."""

RING_COLUMNS: tuple[str, ...] = (*[f.name for f in STEP_SCHEMA], "end_time_s", "num_online_reqs")
DEFAULT_RING_CAPACITY = 8192

# Header slots (float64 each).
_MAGIC, _VERSION, _BUDGET_SEQ, _VALID_UNTIL, _FALLBACK_SEQS, _FALLBACK_TOKENS, _RING_CAP, _RING_COUNT = range(8)
COUNTER_NAMES: tuple[str, ...] = (
    "num_online_running", "num_online_waiting", "num_offline_running", "num_offline_waiting",
    "num_offline_paused", "num_offline_preempted_total", "num_throttled_steps", "num_fallback_steps",
    "online_context_tokens", "offline_context_tokens", "num_online_tokens_total", "num_offline_tokens_total",
    "num_steps_total", "step_time_s_total", "max_num_seqs",
)
_COUNTERS = 8
_SEQS_TABLE = _COUNTERS + len(COUNTER_NAMES)
_TOKENS_TABLE = _SEQS_TABLE + TABLE_SIZE
_HEADER_SLOTS = _TOKENS_TABLE + TABLE_SIZE


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
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class OfflineBudget:
    """How much offline work an engine may run, by the number of online requests it holds.

    `max_offline_seqs[k]` and `max_offline_tokens[k]` apply while k online requests are running
    or waiting (the last entry for any larger k). A controller computes the tables ahead, so the
    engine reacts to a burst of chat at the next step without asking anyone.
    """

    max_offline_seqs: tuple[int, ...]
    max_offline_tokens: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (1 <= len(self.max_offline_seqs) <= TABLE_SIZE and len(self.max_offline_tokens) == len(self.max_offline_seqs)):
            raise ValueError(f"budget tables must have the same length, 1..{TABLE_SIZE}")
        if min(self.max_offline_seqs) < 0 or min(self.max_offline_tokens) < 0:
            raise ValueError("budgets cannot be negative")

    @classmethod
    def flat(cls, max_offline_seqs: int, max_offline_tokens: int) -> OfflineBudget:
        return cls((max_offline_seqs,), (max_offline_tokens,))

    def at(self, num_online: int) -> tuple[int, int]:
        i = min(num_online, len(self.max_offline_seqs) - 1)
        return self.max_offline_seqs[i], self.max_offline_tokens[i]


UNLIMITED = 1 << 30


class EngineChannel:
    """One mapped channel file. `create` on the replica side, `open` in the engine process."""

    def __init__(self, path: Path, mm: mmap.mmap) -> None:
        self.path = path
        self._mm = mm
        self.header = np.ndarray((_HEADER_SLOTS,), dtype=np.float64, buffer=mm, offset=0)
        capacity = int(self.header[_RING_CAP])
        self.ring = np.ndarray((capacity, len(RING_COLUMNS)), dtype=np.float64, buffer=mm,
                               offset=_HEADER_SLOTS * 8)

    @staticmethod
    def _size(capacity: int) -> int:
        return (_HEADER_SLOTS + capacity * len(RING_COLUMNS)) * 8

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
        path = os.environ.get(CHANNEL_ENV)
        return cls.open(path) if path else None

    def close(self, unlink: bool = False) -> None:
        del self.header, self.ring
        self._mm.close()
        if unlink:
            self.path.unlink(missing_ok=True)

    # --- budget: replica writes, engine reads ---------------------------------------------

    def write_budget(self, budget: OfflineBudget, valid_for_s: float, now_s: float | None = None) -> None:
        n = len(budget.max_offline_seqs)
        seqs = np.full(TABLE_SIZE, budget.max_offline_seqs[-1], dtype=np.float64)
        toks = np.full(TABLE_SIZE, budget.max_offline_tokens[-1], dtype=np.float64)
        seqs[:n], toks[:n] = budget.max_offline_seqs, budget.max_offline_tokens
        self.header[_SEQS_TABLE:_TOKENS_TABLE] = seqs
        self.header[_TOKENS_TABLE:_HEADER_SLOTS] = toks
        self.header[_VALID_UNTIL] = (time.time() if now_s is None else now_s) + valid_for_s
        self.header[_BUDGET_SEQ] += 1

    def set_fallback(self, budget: OfflineBudget) -> None:
        self.header[_FALLBACK_SEQS], self.header[_FALLBACK_TOKENS] = budget.at(0)

    def budget_at(self, num_online: int, now_s: float) -> tuple[int, int, bool]:
        """(max offline seqs, max offline tokens per step, fallback?) for this step."""
        h = self.header
        if h[_BUDGET_SEQ] == 0 or now_s > h[_VALID_UNTIL]:
            return int(h[_FALLBACK_SEQS]), int(h[_FALLBACK_TOKENS]), True
        i = min(num_online, TABLE_SIZE - 1)
        return int(h[_SEQS_TABLE + i]), int(h[_TOKENS_TABLE + i]), False

    def budget_seq(self) -> int:
        return int(self.header[_BUDGET_SEQ])

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

    def num_steps(self) -> int:
        return int(self.header[_RING_COUNT])

    def steps_since(self, since: int) -> tuple[np.ndarray, int]:
        """Rows appended after step number `since` (at most what the ring still holds), and the
        step number to pass next time. Leaves a margin so a row being overwritten is never read."""
        count = int(self.header[_RING_COUNT])
        capacity = self.ring.shape[0]
        start = max(since, count - (capacity - 16))
        if start >= count:
            return np.empty((0, len(RING_COLUMNS))), count
        idx = np.arange(start, count) % capacity
        return self.ring[idx].copy(), count


def rows_to_columns(rows: np.ndarray) -> dict[str, np.ndarray]:
    return {name: rows[:, i] for i, name in enumerate(RING_COLUMNS)}
