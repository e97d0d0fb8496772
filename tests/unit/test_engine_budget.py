"""The engine channel and the per-step offline plan (pure; no engine)."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.engine.budget import OfflineBudget
from orchestrator.engine.channel import (
    CHANNEL_PREFIX,
    RING_COLUMNS,
    EngineChannel,
    sweep_stale_channels,
)
from orchestrator.engine.plan import OfflineCandidate, plan_step

DECODE = OfflineCandidate(1, False)


def plan(**kw):
    args = dict(online_tokens=0, num_online_waiting=0, offline_running=[], num_offline_waiting=0,
                max_offline_seqs=4, max_offline_tokens=512, max_step_tokens=256)
    args.update(kw)
    return plan_step(**args)


def test_offline_decodes_run_up_to_the_sequence_budget():
    p = plan(offline_running=[DECODE] * 6, max_offline_seqs=4)
    assert p.run == (0, 1, 2, 3)
    assert p.num_offline_tokens == 4
    assert p.throttled(6, 0)


def test_online_tokens_are_reserved_before_offline_work():
    # 250 of 256 step tokens go to online work: an offline prefill may take only the 6 left.
    p = plan(online_tokens=250, offline_running=[OfflineCandidate(100, True)])
    assert p.run == (0,)
    assert p.token_cap == 256
    assert p.num_offline_tokens == 6


def test_offline_work_sits_out_the_step_that_admits_waiting_chat():
    p = plan(online_tokens=120, num_online_waiting=2,
             offline_running=[OfflineCandidate(100, True), DECODE, DECODE], num_offline_waiting=3)
    assert p.run == ()
    assert p.num_waiting_admitted == 0
    assert p.token_cap == 120


def test_offline_work_sits_out_the_later_chunks_of_a_long_chat_prompt():
    p = plan(online_tokens=256, num_online_prefilling=1, offline_running=[DECODE, DECODE], num_offline_waiting=1)
    assert p.run == () and p.num_waiting_admitted == 0 and p.token_cap == 256


def test_the_token_budget_limits_decodes_too():
    p = plan(offline_running=[DECODE] * 4, max_offline_tokens=2)
    assert p.run == (0, 1)


def test_waiting_offline_requests_fill_free_sequences_only():
    p = plan(offline_running=[DECODE], num_offline_waiting=5, max_offline_seqs=3)
    assert p.num_waiting_admitted == 2
    assert p.token_cap == 256


def test_zero_budget_pauses_all_offline_work():
    p = plan(offline_running=[DECODE] * 3, num_offline_waiting=2, max_offline_seqs=0)
    assert p.run == () and p.num_waiting_admitted == 0 and p.token_cap == 0


def test_budget_table_is_indexed_by_online_count_and_falls_back_when_stale(tmp_path):
    chan = EngineChannel.create(tmp_path / "c.chan", ring_capacity=32, fallback=OfflineBudget.flat(1, 16))
    try:
        reader = EngineChannel.open(chan.path)
        assert reader.budget_at(0, now_s=0.0) == (1, 16, True)  # nothing written yet
        chan.write_budget(OfflineBudget((8, 4, 2), (512, 64, 8)), valid_for_s=10, now_s=100.0)
        assert [reader.budget_at(k, 105.0)[:2] for k in (0, 1, 2, 9)] == [(8, 512), (4, 64), (2, 8), (2, 8)]
        assert reader.budget_at(0, 111.0) == (1, 16, True)
    finally:
        chan.close(unlink=True)


def test_step_ring_returns_new_rows_and_survives_wraparound(tmp_path):
    chan = EngineChannel.create(tmp_path / "c.chan", ring_capacity=32)
    try:
        for i in range(100):
            chan.append_step(np.full(len(RING_COLUMNS), float(i)))
        rows, nxt = chan.steps_since(95)
        assert rows[:, 0].tolist() == [95, 96, 97, 98, 99] and nxt == 100
        rows, _ = chan.steps_since(0)
        # Only what the ring still holds, minus a margin against a row being overwritten.
        assert rows[0, 0] == 84 and rows[-1, 0] == 99
    finally:
        chan.close(unlink=True)


def test_channel_rejects_a_foreign_file(tmp_path):
    bad = tmp_path / "x"
    bad.write_bytes(b"\0" * 4096)
    with pytest.raises(ValueError, match="not a Colocate engine channel"):
        EngineChannel.open(bad)


def test_budget_tables_are_validated():
    with pytest.raises(ValueError):
        OfflineBudget((1, 2), (3,))
    with pytest.raises(ValueError):
        OfflineBudget((-1,), (3,))


def test_channel_files_of_dead_replicas_are_swept_and_live_ones_kept(tmp_path):
    import os
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"{CHANNEL_PREFIX}{dead.pid}-abc.chan"
    live = tmp_path / f"{CHANNEL_PREFIX}{os.getpid()}-def.chan"
    other = tmp_path / "unrelated.chan"
    for p in (stale, live, other):
        p.write_bytes(b"x")
    assert sweep_stale_channels(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists()


def test_cpu_replicas_get_the_quiet_polling_default():
    from orchestrator.names import ENV_POLL_SLEEP_US
    from orchestrator.serving.app import _CPU_ENV_DEFAULTS

    assert float(_CPU_ENV_DEFAULTS[ENV_POLL_SLEEP_US]) > 0
