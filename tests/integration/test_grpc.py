"""Chat over gRPC (colocate.v1.ChatService) on Ray Serve's gRPC proxy, against a live stack of its
own (gRPC enabled on a free port, API keys configured), with a real grpcio client."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time

import grpc
import pytest

from orchestrator.cluster.lifecycle import free_port
from orchestrator.serving.grpc_api import SERVICE_NAME, chat_pb2, chat_pb2_grpc
from tests.integration.conftest import MODEL_CACHE, ROOT, colocate_cmd, start_stack

pytestmark = pytest.mark.integration

KEYS_ENV = "COLOCATE_TEST_GRPC_KEYS"
KEY = "test-key-1"
AUTH = (("authorization", f"Bearer {KEY}"),)
HELLO = [chat_pb2.ChatMessage(role="user", content="Explain why the batch latency is low.")]
MAX_MODEL_LEN = 2048


@pytest.fixture(scope="module")
def gstack(tmp_path_factory):
    port = free_port()
    for info in start_stack(
        tmp_path_factory.mktemp("grpc-stack"),
        model={"id": "colocate-tiny", "source": str(MODEL_CACHE), "build_tiny": "test"},
        engine_kwargs={"max_model_len": MAX_MODEL_LEN, "max_num_seqs": 32},
        serve={"grpc": {"enabled": True, "port": port, "api_keys_env": KEYS_ENV}},
        env={KEYS_ENV: f"{KEY}, test-key-2"},
    ):
        yield {**info, "grpc_target": f"127.0.0.1:{port}"}


@pytest.fixture(scope="module")
def channel(gstack):
    with grpc.insecure_channel(gstack["grpc_target"]) as ch:
        grpc.channel_ready_future(ch).result(timeout=60)
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return chat_pb2_grpc.ChatServiceStub(channel)


def status_json(stack) -> dict:
    out = subprocess.run(colocate_cmd("status", "--json"), cwd=ROOT, env=stack["env"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def request(gstack, **kw) -> chat_pb2.ChatRequest:
    kw.setdefault("messages", HELLO)
    return chat_pb2.ChatRequest(model=gstack["model"], **kw)


def test_up_and_status_show_the_grpc_endpoint(gstack):
    assert f"grpc: {gstack['grpc_target']}" in gstack["up_stdout"]
    assert status_json(gstack)["grpc_endpoint"] == gstack["grpc_target"]
    out = subprocess.run(colocate_cmd("status"), cwd=ROOT, env=gstack["env"], capture_output=True,
                         text=True, timeout=120)
    assert f"gRPC:        {gstack['grpc_target']}" in out.stdout


def test_streaming_chat_one_message_per_chunk_then_usage(stub, gstack):
    chunks = list(stub.Chat(request(gstack, max_tokens=24, ignore_eos=True, temperature=0.0), metadata=AUTH,
                            timeout=120))
    *text, final = chunks
    assert final.finish_reason == "length" and final.HasField("usage") and final.delta == ""
    assert final.usage.completion_tokens == 24 and final.usage.prompt_tokens > 5
    assert final.usage.total_tokens == final.usage.prompt_tokens + 24
    # One message per engine output: a token (whose text may be empty while it ends inside a
    # UTF-8 character), or a few when the engine got ahead of the stream on a loaded host.
    assert 18 <= len(text) <= 24 and "".join(c.delta for c in text)
    assert text[0].role == "assistant" and all(c.role == "" for c in text[1:])
    assert not any(c.HasField("usage") or c.finish_reason for c in text)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id and chunks[0].model == gstack["model"]


def test_unary_complete(stub, gstack):
    resp = stub.Complete(request(gstack, max_tokens=12, ignore_eos=True, seed=3, top_p=0.9, stop=["\u2603"]),
                         metadata=AUTH, timeout=120)
    assert resp.message.role == "assistant" and resp.message.content
    assert resp.usage.completion_tokens == 12 and resp.finish_reason == "length"
    assert resp.model == gstack["model"] and resp.id


def test_concurrent_calls_all_complete(gstack):
    async def run():
        async with grpc.aio.insecure_channel(gstack["grpc_target"]) as ch:
            astub = chat_pb2_grpc.ChatServiceStub(ch)

            async def one_stream(i):
                msgs = [chat_pb2.ChatMessage(role="user", content=f"request {i}")]
                return [c async for c in astub.Chat(request(gstack, messages=msgs, max_tokens=16, ignore_eos=True),
                                                    metadata=AUTH, timeout=180)]

            async def one_unary(i):
                msgs = [chat_pb2.ChatMessage(role="user", content=f"unary {i}")]
                return await astub.Complete(request(gstack, messages=msgs, max_tokens=16, ignore_eos=True),
                                            metadata=AUTH, timeout=180)

            return await asyncio.gather(*(one_stream(i) for i in range(6)), *(one_unary(i) for i in range(4)))

    results = asyncio.run(run())
    streams, unaries = results[:6], results[6:]
    assert [s[-1].usage.completion_tokens for s in streams] == [16] * 6
    assert [u.usage.completion_tokens for u in unaries] == [16] * 4
    assert len({s[0].id for s in streams} | {u.id for u in unaries}) == 10


def _expect(code, fn):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    assert info.value.code() == code, (info.value.code(), info.value.details())
    return info.value.details()


@pytest.mark.parametrize("method", ["Chat", "Complete"])
def test_errors_are_grpc_status_codes_and_serving_continues(stub, gstack, method):
    def call(req, metadata=AUTH):
        rpc = getattr(stub, method)
        return (lambda: list(rpc(req, metadata=metadata, timeout=60))) if method == "Chat" else (
            lambda: rpc(req, metadata=metadata, timeout=60))

    bad = grpc.StatusCode.INVALID_ARGUMENT
    role = _expect(bad, call(request(gstack, messages=[chat_pb2.ChatMessage(role="wizard", content="hi")])))
    assert "role" in role and "wizard" in role
    assert "messages" in _expect(bad, call(request(gstack, messages=[])))
    assert "request_class" in _expect(bad, call(request(gstack, max_tokens=4, request_class="urgent")))
    too_long = _expect(bad, call(request(gstack, max_tokens=100_000)))
    assert "max_tokens" in too_long or str(MAX_MODEL_LEN) in too_long, too_long
    assert _expect(bad, call(request(gstack, max_tokens=4, temperature=-1.0)))
    unknown = _expect(grpc.StatusCode.NOT_FOUND,
                      call(chat_pb2.ChatRequest(model="no-such-model", messages=HELLO, max_tokens=4)))
    assert "no-such-model" in unknown
    unauth = grpc.StatusCode.UNAUTHENTICATED
    assert "missing API key" in _expect(unauth, call(request(gstack, max_tokens=4), metadata=()))
    assert "invalid API key" in _expect(unauth, call(request(gstack, max_tokens=4),
                                                     metadata=(("authorization", "Bearer wrong"),)))
    # The other configured key works, and the server still serves after every error above.
    other = (("authorization", "Bearer test-key-2"),)
    resp = stub.Complete(request(gstack, max_tokens=4, ignore_eos=True), metadata=other, timeout=60)
    assert resp.usage.completion_tokens == 4


def test_request_classes_are_counted_and_grpc_requests_are_timed_by_the_engine(stub, gstack):
    [before] = status_json(gstack)["replicas"]
    for request_class in ("offline", "offline", "online", ""):
        stub.Complete(request(gstack, max_tokens=4, request_class=request_class), metadata=AUTH, timeout=60)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        report = status_json(gstack)
        [after] = report["replicas"]
        got = {c: after["num_completed"][c] - before["num_completed"][c] for c in ("online", "offline")}
        if got == {"online": 2, "offline": 2}:
            break
        time.sleep(1)
    assert got == {"online": 2, "offline": 2}
    # Online gRPC requests reach the engine's per-request timing like HTTP ones: the controller
    # sees their TTFT and TPOT (this stack has served gRPC only). The controller's view covers the
    # last 5 s, so gRPC chat keeps flowing while the status is read.
    stop = threading.Event()

    def chat_loop():
        while not stop.is_set():
            list(stub.Chat(request(gstack, max_tokens=16, ignore_eos=True), metadata=AUTH, timeout=60))

    sender = threading.Thread(target=chat_loop, daemon=True)
    sender.start()
    row = None
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and row is None:
            rows = (status_json(gstack)["controller"] or {}).get("replicas") or []
            if rows and rows[0].get("observed_ttft_p99_ms") is not None and rows[0].get("observed_tpot_p99_ms"):
                row = rows[0]
    finally:
        stop.set()
        sender.join(timeout=60)
    assert row is not None, "the controller never saw the gRPC requests' latencies"
    assert row["observed_ttft_p99_ms"] > 0 and row["observed_tpot_p99_ms"] > 0


def test_reflection_lists_and_describes_the_service(channel, gstack):
    """What a generic tool (grpcurl) does: list services, resolve the method's types by
    reflection alone, and call it with messages built from the reflected descriptors."""
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    db = ProtoReflectionDescriptorDatabase(channel)
    assert SERVICE_NAME in db.get_services()
    pool = descriptor_pool.DescriptorPool(db)
    method = pool.FindServiceByName(SERVICE_NAME).methods_by_name["Complete"]
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    req = request_cls(model=gstack["model"], max_tokens=4, ignore_eos=True)
    req.messages.add(role="user", content="hello")
    call = channel.unary_unary(f"/{SERVICE_NAME}/Complete", request_serializer=request_cls.SerializeToString,
                               response_deserializer=response_cls.FromString)
    resp = call(req, metadata=AUTH, timeout=60)
    assert resp.usage.completion_tokens == 4 and resp.message.content


def test_http_still_serves_beside_grpc(gstack):
    from openai import OpenAI

    client = OpenAI(base_url=gstack["endpoint"], api_key="unused", max_retries=0, timeout=120)
    resp = client.chat.completions.create(model=gstack["model"], messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 4
