"""Budget-aware offline routing (`serve.offline_routing: room`) on two real replicas.

One replica is busy with chat, so its offline budget at that online load is smaller than the
idle replica's; Serve's own power of two choices would split a burst of offline requests about
evenly between them, the `room` router sends most of it to the idle one. Chat still goes by two
choices.
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
        engine_kwargs={"max_model_len": 2048, "max_num_seqs": 32},
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
