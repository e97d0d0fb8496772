"""Two real replicas: budget-aware offline routing, then faults under load.

Routing (`serve.offline_routing: room`): one replica is busy with chat, so its offline budget at
that online load is smaller than the idle replica's; Serve's own power of two choices would split
a burst of offline requests about evenly between them, the `room` router sends most of it to the
idle one. Chat still goes by two choices.

Faults (bench.faults, the code behind `colocate faults`): chat at a steady rate and a batch job
while a replica, the controller and the job's driver are killed and the KV cache is filled. Runs
last in the module (it kills a replica) and named to run after the session stack's tests.
"""

from __future__ import annotations

import threading
import time

import openai
import pytest

from tests.integration.conftest import MODEL_CACHE, start_stack

pytestmark = pytest.mark.integration

NUM_OFFLINE = 8


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory):
    yield from start_stack(
        tmp_path_factory.mktemp("routing"),
        model={"id": "colocate-tiny", "source": str(MODEL_CACHE), "build_tiny": "test"},
        # A small KV cache (4,096 tokens per replica): the fault test fills it with a few requests.
        engine_kwargs={"max_model_len": 2048, "max_num_seqs": 32, "num_gpu_blocks_override": 256},
        replicas={"num_replicas": 2},
        serve={"offline_routing": "room", "routing_stats_period_s": 0.5},
    )


def reports(stack) -> dict[str, dict]:
    import ray

    from orchestrator.cluster.lifecycle import connect
    from orchestrator.serving.registry import get_or_create_registry

    connect(stack["gcs_address"])
    return {r["replica_id"]: r for r in ray.get(get_or_create_registry().snapshot.remote())}


def test_offline_work_goes_to_the_replica_chat_leaves_room_on(two_replicas):
    stack = two_replicas
    deadline = time.monotonic() + 120
    while len(reports(stack)) < 2 or not all(r.get("budget") for r in reports(stack).values()):
        assert time.monotonic() < deadline, reports(stack)
        time.sleep(1)
    client = openai.OpenAI(base_url=stack["endpoint"], api_key="unused", max_retries=0)

    # A long chat stream holds one replica busy for the whole test.
    chat_done = threading.Event()

    def chat():
        try:
            stream = client.chat.completions.create(
                model="colocate-tiny", messages=[{"role": "user", "content": "tell a long story"}],
                max_tokens=1900, stream=True, extra_body={"ignore_eos": True})
            for _ in stream:
                if chat_done.is_set():
                    break
        finally:
            chat_done.set()

    threading.Thread(target=chat, daemon=True).start()
    busy = None
    deadline = time.monotonic() + 30
    while busy is None:
        assert time.monotonic() < deadline and not chat_done.is_set(), "the chat stream did not start"
        busy = next((rid for rid, r in reports(stack).items() if r["num_inflight"]["online"] == 1), None)
        time.sleep(0.2)
    (idle,) = [rid for rid in reports(stack) if rid != busy]
    budgets = {rid: r["budget"]["max_offline_seqs"] for rid, r in reports(stack).items()}
    assert budgets[busy][1] < budgets[idle][0], budgets  # chat leaves the busy replica less room
    time.sleep(2.0)  # two routing-stats publications with the chat in them

    before = {rid: r["num_completed"]["offline"] for rid, r in reports(stack).items()}
    threads = [threading.Thread(target=lambda: client.chat.completions.create(
        model="colocate-tiny", messages=[{"role": "user", "content": "summarize this"}], max_tokens=64,
        extra_body={"request_class": "offline", "ignore_eos": True})) for _ in range(NUM_OFFLINE)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not chat_done.is_set(), "the chat stream ended before the offline work did"
    chat_done.set()
    deadline = time.monotonic() + 10
    while True:
        after = {rid: r["num_completed"]["offline"] for rid, r in reports(stack).items()}
        if sum(after.values()) - sum(before.values()) == NUM_OFFLINE or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    placed = {rid: after[rid] - before[rid] for rid in after}
    assert sum(placed.values()) == NUM_OFFLINE, placed
    # Room: the idle replica's budget against the busy one's at one chat request; two choices
    # on queue length would give the idle one about half.
    assert placed[idle] >= NUM_OFFLINE - budgets[busy][1], (placed, budgets)
    assert placed[idle] >= 6, (placed, budgets)


def test_faults_under_load_lose_no_batch_result_and_leave_no_chat_hanging(two_replicas, tmp_path):
    from bench.faults import FaultRun, FaultsOptions, Stack, format_report

    stack = two_replicas
    # The driver first (the default order), so it is killed while its job runs on any host.
    opts = FaultsOptions(rate_per_s=2.0, warmup_s=10.0, phase_s=25.0, num_batch=150, chat_output_tokens=64,
                         kv_fill_requests=8, request_timeout_s=60.0, job_timeout_s=400.0)
    slo = {"ttft_p99_ms": 1000.0, "tpot_p99_ms": 200.0}  # loose: invariants, not latency, are tested
    run = FaultRun(Stack(endpoint=stack["endpoint"], model=stack["model"], gcs_address=stack["gcs_address"],
                         dashboard_url=stack["dashboard_url"]), opts, tmp_path / "faults", slo, on_progress=print)
    result = run.run()
    report = format_report(result)
    # The batch job: exactly one result per input, after a replica and its own driver were killed.
    assert result["job"]["status"] == "SUCCEEDED", report
    assert result["job"]["exactly_once"], report
    assert result["faults"][0]["fault"] == "driver" and result["faults"][0]["job_running"], report
    assert "resubmitted" in result["faults"][0]["detail"], report
    assert all(f["job_running"] for f in result["faults"]), report  # each fault met a running job
    # Chat: nothing hangs; what was in flight at each fault completed or failed, and after each
    # fault new chat is served within the watch.
    assert result["chat"]["hung"] == 0, report
    for fault in result["faults"]:
        assert fault["in_flight_hung"] == 0, report
        assert fault["new_chat_served_after_s"] is not None, report
    assert (tmp_path / "faults" / "faults.png").exists()
