"""Shared-memory bookkeeping of engines (orchestrator.engine.shm), on a temp dir."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys

from orchestrator.engine import shm


def _segment(directory, name, size=4096):
    path = directory / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_mapped_segments_sees_what_a_process_maps_and_nothing_else(tmp_path):
    mapped, unmapped = _segment(tmp_path, "psm_mapped"), _segment(tmp_path, "psm_unmapped")
    ours = _segment(tmp_path, "colocate-engine-1-x.chan")
    sem = _segment(tmp_path, "sem.loky-1-abc")
    maps = []
    for path in (mapped, ours, sem):
        with open(path, "r+b") as f:
            maps.append(mmap.mmap(f.fileno(), 4096))
    try:
        names = shm.mapped_segments([os.getpid(), _dead_pid()], directory=tmp_path)
    finally:
        for m in maps:
            m.close()
    assert names == {"psm_mapped", "sem.loky-1-abc"}  # not the unmapped file, not our own channel
    assert unmapped.exists()


def test_sweep_removes_segments_only_once_every_recorded_process_has_exited(tmp_path):
    dead = _dead_pid()
    for name in ("psm_a", "psm_b", "psm_c", f"sem.loky-{dead}-xyz"):
        _segment(tmp_path, name)
    shm.write_record(dead, [dead], ["psm_a", "psm_gone"], directory=tmp_path)
    live = shm.write_record(os.getpid(), [dead, os.getpid()], ["psm_b"], directory=tmp_path)
    # the recorded segment, and the semaphore the dead process's name says it made
    assert shm.sweep(directory=tmp_path) == ["psm_a", f"sem.loky-{dead}-xyz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["psm_b", "psm_c", live.name])
    (tmp_path / "colocate-shm-9.json").write_text("{not json")  # half-written: left alone
    assert shm.sweep(directory=tmp_path) == []
    assert (tmp_path / "colocate-shm-9.json").exists()


def test_a_teardown_sweep_waits_for_an_orphaned_engine_to_exit_and_never_for_a_live_writer(tmp_path):
    import time

    _segment(tmp_path, "psm_orphan")
    _segment(tmp_path, "psm_live")
    # The replica that wrote the record is gone; its engine process still runs for a moment.
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.0)"])
    shm.write_record(_dead_pid(), [engine.pid], ["psm_orphan"], directory=tmp_path)
    # A live writer (this process) whose engine runs on: not waited for.
    runner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    shm.write_record(os.getpid(), [runner.pid], ["psm_live"], directory=tmp_path)
    try:
        assert shm.sweep(directory=tmp_path) == []  # no wait: the orphan is still exiting
        reaper = __import__("threading").Thread(target=engine.wait)  # reaped, as init would
        reaper.start()
        started = time.monotonic()
        assert shm.sweep(directory=tmp_path, wait_s=10.0) == ["psm_orphan"]
        assert time.monotonic() - started < 5.0  # returned once the orphan exited, not at the deadline
        assert (tmp_path / "psm_live").exists()
    finally:
        runner.kill()
        runner.wait()
        engine.wait()
