"""An append-only results log: the batch job's checkpoint and, for JSONL output, the output itself.

Every finished request is one complete JSON line, written with a single write and fsync'd before
the request counts as done. A kill can at worst leave a torn last line, which `open` cuts off, so
resuming never loses a finished result and never writes one twice.

Next to the output, a small record (`OUTPUT.meta.json`) says which request each `custom_id` stood
for when its result was written. It is what lets a job tell its own output from anything else
at that path: a file it did not write, or the results of another input, which it must neither
cut nor mix new results into. The output lines themselves stay plain OpenAI Batch output.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RESULTS_KIND = "colocate-batch-results"
RESULTS_VERSION = 1


class OutputRefused(RuntimeError):
    """Going on would destroy or mix up data that is not this job's; raised before writing anything."""


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def meta_path(output: Path) -> Path:
    return output.with_name(output.name + ".meta.json")


def is_result_record(value: Any) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("custom_id"), str)
            and "response" in value and "error" in value)


def scan_results(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """The results in `path` by custom_id, and the byte length of its complete lines. Read only.

    Only a last line without its newline that starts like a record (a write torn by a kill) is left
    out, for `open` to cut; any other line that is not a result record means the file is not a
    results log, and nothing of it may be cut.
    """
    done: dict[str, dict[str, Any]] = {}
    good_bytes = 0
    if not path.exists():
        return done, good_bytes
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n") and raw.startswith(b"{"):
                break
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
            if not raw.endswith(b"\n") or not is_result_record(record):
                raise OutputRefused(f"{path} is not a batch results log (line {line_no} is not a result record); "
                                    "choose another --output or delete it")
            done.setdefault(record["custom_id"], record)
            good_bytes += len(raw)
    return done, good_bytes


def mismatched_results(answered: Iterable[str], recorded: dict[str, str], wanted: dict[str, str]) -> list[str]:
    """custom_ids whose result does not answer the request the input now has under that id: the id
    is gone from the input, its request changed, or what it answered was never recorded."""
    return sorted(c for c in answered if c not in wanted or recorded.get(c) != wanted[c])


def read_meta(path: Path) -> dict[str, Any] | None:
    """The results record at `path`; None if there is none, OutputRefused if the file is not one."""
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        meta = None
    if (not isinstance(meta, dict) or meta.get("kind") != RESULTS_KIND or meta.get("version") != RESULTS_VERSION
            or not isinstance(meta.get("requests"), dict)):
        raise OutputRefused(f"{path} exists and is not a batch results record; choose another --output or delete it")
    return meta


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    """Replace the record atomically (tmp + rename, both fsync'd): a kill leaves the old or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"kind": RESULTS_KIND, "version": RESULTS_VERSION, **meta}, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class ResultLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        self._good_bytes = 0
        self._scanned_size: int | None = None
        self._file = None
        self._lock = None

    def _size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def load(self) -> ResultLog:
        """Read what is done, writing nothing (OutputRefused if the file is not a results log)."""
        self._scanned_size = self._size()
        self.done, self._good_bytes = scan_results(self.path)
        return self

    def open(self) -> ResultLog:
        """Check the file, take the lock (one writer per output), cut a torn tail."""
        if self._scanned_size is None:
            self.load()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(lock_path(self.path), "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise OutputRefused(f"{self.path} is being written by another running job") from None
        self._lock = lock
        try:
            if self._size() != self._scanned_size:  # written by someone else before we held the lock
                self.load()
        except OutputRefused:
            self.close()
            raise
        if self.path.exists() and self._scanned_size > self._good_bytes:
            with open(self.path, "r+b") as f:
                f.truncate(self._good_bytes)
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
