"""The vLLM fence (orchestrator.compat.vllm_api) against the installed vLLM: it imports, and the
internals it promises exist. Component tier: imports vLLM (no engine, no Ray cluster)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.component


def test_engine_polling_sleeps_instead_of_spinning(monkeypatch):
    import time

    from vllm.distributed.device_communicators import shm_broadcast

    from orchestrator.compat.vllm_api import quiet_engine_polling

    monkeypatch.setattr(shm_broadcast, "sched_yield", shm_broadcast.sched_yield)
    spin = shm_broadcast.sched_yield
    assert not quiet_engine_polling(0) and shm_broadcast.sched_yield is spin
    assert quiet_engine_polling(2000)
    start = time.perf_counter()
    for _ in range(5):
        shm_broadcast.sched_yield()
    assert time.perf_counter() - start >= 5 * 0.002




def test_the_fence_names_every_scheduler_internal_it_uses():
    from vllm.v1.core.sched.scheduler import Scheduler

    from orchestrator.compat import vllm_api

    for name in ("_preempt_request", "schedule", "update_from_output", "finish_requests"):
        assert hasattr(Scheduler, name), name
    assert vllm_api.VLLM_VERSION.startswith(vllm_api.TESTED_VERSIONS)


def test_an_untested_version_fails_with_the_tested_ones_named():
    from orchestrator.compat.vllm_api import check_version

    check_version("0.32.0")
    with pytest.raises(ImportError, match=r"tested with vLLM 0\.32\.x; vLLM 0\.40\.1 is installed"):
        check_version("0.40.1")
    check_version("0.40.1", allow_untested=True)
