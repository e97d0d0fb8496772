"""Shared-memory segments of engine processes, removed once those processes are gone.

vLLM's engine core and its worker share message queues through POSIX shared memory
(`/dev/shm/psm_*`, created with `multiprocessing.shared_memory`). They are unlinked only on a
clean shutdown; an engine killed with its replica or cluster leaves each of its segments behind
(a sparse 160 MB each with the CPU build: 41 of them after a day of runs here). So whoever may
see an engine die records what it maps: a replica writes, for its engine's processes, a record
file next to the segments, and anyone may later sweep records whose processes have all exited;
the teardown of a stack collects the segments its processes map before it stops them. Only
segments that processes of ours mapped are ever unlinked, and only after those processes exited.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

SHM_DIR = Path("/dev/shm")
RECORD_PREFIX = "colocate-shm-"
_OURS = ("colocate-",)  # our own files there (engine channels, these records) have their own cleanup


def mapped_segments(pids: Iterable[int], directory: Path = SHM_DIR) -> set[str]:
    """Names of the live (not yet unlinked) files under `directory` that these processes map
    (segments, and named semaphores such as joblib/loky's `sem.loky-*`); our own files
    excluded. Processes that are gone or unreadable are skipped."""
    prefix = f"{directory}/"
    names: set[str] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                lines = f.readlines()
        except OSError:
            continue
        for line in lines:
            at = line.find(prefix)
            if at < 0 or line.rstrip().endswith("(deleted)"):
                continue
            name = line[at + len(prefix):].strip()
            if "/" in name or name.startswith(_OURS):
                continue
            names.add(name)
    return names


def created_by(pids: Iterable[int], directory: Path = SHM_DIR) -> set[str]:
    """Files whose name says which process made them: joblib/loky's semaphores
    (`sem.loky-<pid>-*`), which its resource tracker unlinks only if it outlives their maker,
    and which need not be mapped by anyone any more when the maker is killed."""
    names: set[str] = set()
    for pid in set(pids):
        names.update(p.name for p in directory.glob(f"sem.loky-{pid}-*"))
    return names


def write_record(owner_pid: int, pids: Iterable[int], segments: Iterable[str], directory: Path = SHM_DIR) -> Path:
    """Record (atomically) that `pids` map `segments`, under the owner's name."""
    path = directory / f"{RECORD_PREFIX}{owner_pid}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pids": sorted(set(pids)), "segments": sorted(set(segments))}))
    tmp.replace(path)
    return path


def unlink_segments(names: Iterable[str], directory: Path = SHM_DIR) -> list[str]:
    removed = []
    for name in sorted(set(names)):
        try:
            (directory / name).unlink()
            removed.append(name)
        except FileNotFoundError:
            pass
        except OSError:
            pass  # not ours to remove after all (another user's file of the same name)
    return removed


def sweep(directory: Path = SHM_DIR, wait_s: float = 0.0) -> list[str]:
    """Unlink the segments of every record whose processes have all exited; drop the record.
    Returns the segments removed.

    With `wait_s`, records of orphans (the replica that wrote the record is gone, some of its
    engine processes still run) are polled until those exit, for at most `wait_s`: a killed
    replica's engine core outlives it by a moment and unlinks nothing on its way out, and a
    stack's teardown that swept while it was still exiting left its 160 MB segment behind (a
    full test run, twice). A record whose writer is alive is never waited for."""
    removed: list[str] = []
    deadline = time.monotonic() + wait_s
    while True:
        orphans = False
        for path in directory.glob(f"{RECORD_PREFIX}*.json"):
            try:
                record = json.loads(path.read_text())
                pids, segments = [int(p) for p in record["pids"]], list(record["segments"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being written, or not ours to judge
            if any(process_alive(pid) for pid in pids):
                owner = path.name[len(RECORD_PREFIX):-len(".json")]
                orphans |= owner.isdigit() and not process_alive(int(owner))
                continue
            removed += unlink_segments({*segments, *created_by(pids, directory)}, directory)
            path.unlink(missing_ok=True)
        if not orphans or time.monotonic() >= deadline:
            return removed
        time.sleep(0.2)


def process_alive(pid: int) -> bool:
    """A process with this pid exists and has not exited (a zombie has: its mappings are gone,
    and in a container whose init reaps nothing it may stay a zombie for good)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
