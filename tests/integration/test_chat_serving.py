"""Chat serving on a real local Ray cluster with a real vLLM-on-CPU replica, via the openai client."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.integration.conftest import ROOT, colocate_cmd

pytestmark = pytest.mark.integration

HELLO = [{"role": "user", "content": "Explain why the batch latency is low."}]


@pytest.fixture(scope="module")
def client(stack) -> OpenAI:
    return OpenAI(base_url=stack["endpoint"], api_key="unused", max_retries=0, timeout=120)


def status_json(stack) -> dict:
    out = subprocess.run(colocate_cmd("status", "--json"), cwd=ROOT, env=stack["env"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_up_prints_the_endpoint(stack):
    assert f"endpoint: {stack['endpoint']}" in stack["up_stdout"]


def test_models_lists_the_served_model(client, stack):
    ids = [m.id for m in client.models.list().data]
    assert ids == [stack["model"]]


def test_plain_chat_returns_the_requested_number_of_tokens(client, stack):
    resp = client.chat.completions.create(
        model=stack["model"], messages=HELLO, max_tokens=12, extra_body={"ignore_eos": True}
    )
    assert resp.choices[0].message.role == "assistant"
    assert resp.usage.completion_tokens == 12
    assert resp.usage.prompt_tokens > 5


def test_streaming_chat_sends_each_token_as_it_is_produced(client, stack):
    stream = client.chat.completions.create(
        model=stack["model"], messages=HELLO, max_tokens=48, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = [c for c in stream if c.choices and c.choices[0].finish_reason is None]
    assert len(chunks) >= 40 and "".join(c.choices[0].delta.content or "" for c in chunks)
    # Serve LLM's default stream batching hands the proxy several tokens per write (every 50 ms);
    # the replica records the largest write it has made. One chunk per write: no batching.
    deadline = time.monotonic() + 10
    while True:
        [replica] = status_json(stack)["replicas"]
        if replica["max_chunks_per_stream_write"] >= 1 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert replica["max_chunks_per_stream_write"] == 1


def test_completions_endpoint(client, stack):
    resp = client.completions.create(model=stack["model"], prompt="The model", max_tokens=8,
                                     extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 8


def test_concurrent_requests_all_complete(stack):
    async def run():
        aclient = AsyncOpenAI(base_url=stack["endpoint"], api_key="unused", max_retries=0, timeout=120)
        tasks = [
            aclient.chat.completions.create(
                model=stack["model"], messages=[{"role": "user", "content": f"request {i}"}],
                max_tokens=16, extra_body={"ignore_eos": True},
            )
            for i in range(8)
        ]
        return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    assert [r.usage.completion_tokens for r in results] == [16] * 8
    assert len({r.id for r in results}) == 8


def _expect_error(fn, exc_type, status_code):
    with pytest.raises(exc_type) as info:
        fn()
    assert info.value.status_code == status_code
    return info.value


def test_malformed_requests_get_openai_style_4xx_and_serving_continues(client, stack):
    missing = _expect_error(
        lambda: client.post("/chat/completions", body={"model": stack["model"]}, cast_to=dict),
        openai.BadRequestError, 400,
    )
    assert "messages" in str(missing.message)
    unknown = _expect_error(
        lambda: client.chat.completions.create(model="no-such-model", messages=HELLO, max_tokens=4),
        openai.NotFoundError, 404,
    )
    assert "no-such-model" in str(unknown.message)
    too_long = _expect_error(
        lambda: client.chat.completions.create(model=stack["model"], messages=HELLO, max_tokens=100_000),
        openai.BadRequestError, 400,
    )
    assert "max_tokens" in str(too_long.message)
    bad_class = _expect_error(
        lambda: client.chat.completions.create(model=stack["model"], messages=HELLO, max_tokens=4,
                                               extra_body={"request_class": "urgent"}),
        openai.BadRequestError, 400,
    )
    assert "request_class" in str(bad_class.message)
    for err in (missing, unknown, too_long, bad_class):
        assert isinstance(err.body, dict) and err.body.get("message"), err.body
    resp = client.chat.completions.create(model=stack["model"], messages=HELLO, max_tokens=4)
    assert resp.choices[0].message.content is not None


def test_request_class_reaches_the_server_and_status_reports_replicas(client, stack):
    before = status_json(stack)
    assert before["application_status"] == "RUNNING"
    [replica] = before["replicas"]
    assert replica["state"] == "RUNNING" and replica["model"] == stack["model"]
    assert {"num_running_reqs", "num_waiting_reqs"} <= set(replica)
    for request_class in ("offline", "offline", "online"):
        client.chat.completions.create(model=stack["model"], messages=HELLO, max_tokens=4,
                                       extra_body={"request_class": request_class})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        [after] = status_json(stack)["replicas"]
        got = {c: after["num_completed"][c] - replica["num_completed"][c] for c in ("online", "offline")}
        if got == {"online": 1, "offline": 2}:
            break
        time.sleep(1)
    assert got == {"online": 1, "offline": 2}
