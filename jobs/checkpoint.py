"""An append-only results log: the batch job's checkpoint and, for JSONL output, the output itself.

Every finished request is one complete JSON line, written with a single write and fsync'd before
the request counts as done. A kill can at worst leave a torn last line, which `open` cuts off, so
resuming never loses a finished result and never writes one twice.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any


class ResultLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        self._file = None
        self._lock = None

    def open(self) -> ResultLog:
        """Take the lock (one writer per output), load what is done, cut a torn tail."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path.with_name(self.path.name + ".lock"), "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{self.path} is being written by another running job") from None
        good_bytes = 0
        if self.path.exists():
            with open(self.path, "rb") as f:
                for raw in f:
                    if not raw.endswith(b"\n"):
                        break
                    try:
                        record = json.loads(raw)
                    except json.JSONDecodeError:
                        break
                    self.done.setdefault(record["custom_id"], record)
                    good_bytes += len(raw)
            with open(self.path, "r+b") as f:
                f.truncate(good_bytes)
        self._file = open(self.path, "ab")
        return self

    def append(self, record: dict[str, Any]) -> None:
        if record["custom_id"] in self.done:
            return
        self._file.write((json.dumps(record, separators=(",", ":")) + "\n").encode())
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done[record["custom_id"]] = record

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._lock:
            self._lock.close()
