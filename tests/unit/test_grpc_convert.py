"""The gRPC chat service's pure parts: stubs against the proto, proto <-> OpenAI conversion,
error mapping and access checks (no Ray cluster, no vLLM)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from unittest.mock import Mock

import grpc
import pytest
import yaml

from orchestrator.config import ConfigError, GrpcConfig, parse_config
from orchestrator.serving.grpc_api import SERVICE_NAME, SERVICER_FUNCTION, chat_pb2, chat_pb2_grpc
from orchestrator.serving.grpc_api.convert import (
    GrpcAccess,
    GrpcError,
    StreamTranslator,
    api_key_digests_from_env,
    completion_message,
    event_error,
    grpc_code,
    is_loopback,
    peer_host,
    request_body,
    sse_events,
    validation_message,
)

ROOT = Path(__file__).resolve().parents[2]
HELLO = [chat_pb2.ChatMessage(role="user", content="hi")]


def test_checked_in_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) regenerates the stubs")
    from orchestrator.serving.grpc_api import codegen

    for name, path in codegen.generate(tmp_path).items():
        checked_in = codegen.PACKAGE_DIR / name
        # The stub names the grpcio-tools release that wrote it as the lowest grpcio it runs on;
        # a newer tools release changes only that line, and the older floor is the one to keep.
        assert _without_tools_version(checked_in.read_text()) == _without_tools_version(path.read_text()), (
            f"{checked_in} does not match chat.proto: run python -m orchestrator.serving.grpc_api.codegen")


def _without_tools_version(text: str) -> str:
    return re.sub(r"^GRPC_GENERATED_VERSION = .*$", "GRPC_GENERATED_VERSION = ...", text, flags=re.M)


def test_service_shape():
    service = chat_pb2.DESCRIPTOR.services_by_name["ChatService"]
    assert service.full_name == SERVICE_NAME == "colocate.v1.ChatService"
    chat, complete = service.methods_by_name["Chat"], service.methods_by_name["Complete"]
    assert chat.server_streaming and not chat.client_streaming
    assert not complete.server_streaming and not complete.client_streaming
    fields = set(chat_pb2.ChatRequest.DESCRIPTOR.fields_by_name)
    assert {"model", "messages", "max_tokens", "temperature", "top_p", "stop", "seed", "request_class"} <= fields


def test_servicer_function_registers_both_methods():
    module, _, func = SERVICER_FUNCTION.partition(":")
    assert module == chat_pb2_grpc.__name__ and func == "add_ChatServiceServicer_to_server"

    class FakeServer:
        def __init__(self):
            self.handlers = {}

        def add_generic_rpc_handlers(self, handlers):
            pass

        def add_registered_method_handlers(self, service, handlers):
            self.handlers[service] = handlers

    server = FakeServer()
    getattr(chat_pb2_grpc, func)(Mock(), server)  # Serve passes a Mock too
    handlers = server.handlers[SERVICE_NAME]
    assert handlers["Chat"].response_streaming and not handlers["Complete"].response_streaming


# --- request ------------------------------------------------------------------------------------

def test_request_body_mirrors_the_openai_body():
    req = chat_pb2.ChatRequest(model="m", messages=HELLO, max_tokens=12, temperature=0.0, top_p=0.9,
                               stop=["\n", "END"], seed=7, request_class="offline", ignore_eos=True)
    assert request_body(req, stream=True) == {
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 12,
        "temperature": 0.0, "top_p": 0.9, "seed": 7, "stop": ["\n", "END"], "request_class": "offline",
        "ignore_eos": True, "stream_options": {"include_usage": True}}


def test_unset_fields_are_left_out_like_absent_json_fields():
    body = request_body(chat_pb2.ChatRequest(messages=HELLO), stream=False)
    # An explicit 0 is sent (temperature 0 is greedy), an unset field is not.
    assert body == {"model": None, "messages": [{"role": "user", "content": "hi"}], "stream": False}
    assert request_body(chat_pb2.ChatRequest(messages=HELLO, temperature=0.0), stream=False)["temperature"] == 0.0


def test_no_messages_is_invalid_argument():
    with pytest.raises(GrpcError) as info:
        request_body(chat_pb2.ChatRequest(model="m"), stream=True)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "messages" in info.value.message


def test_validation_message_names_fields():
    errors = [{"loc": ("messages", 0, "role"), "msg": "Field required"}, {"loc": (), "msg": "bad"}]
    assert validation_message(errors) == "messages.0.role: Field required; <request>: bad"


# --- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("status, code", [
    (400, grpc.StatusCode.INVALID_ARGUMENT), (422, grpc.StatusCode.INVALID_ARGUMENT),
    (401, grpc.StatusCode.UNAUTHENTICATED), (404, grpc.StatusCode.NOT_FOUND),
    (408, grpc.StatusCode.DEADLINE_EXCEEDED), (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (500, grpc.StatusCode.INTERNAL), (503, grpc.StatusCode.UNAVAILABLE),
    (418, grpc.StatusCode.FAILED_PRECONDITION), (None, grpc.StatusCode.UNKNOWN),
])
def test_http_status_to_grpc_code(status, code):
    assert grpc_code(status) == code


def test_grpc_error_survives_pickling_between_processes():
    err = pickle.loads(pickle.dumps(GrpcError(grpc.StatusCode.NOT_FOUND, "no model")))
    assert isinstance(err, GrpcError) and err.code == grpc.StatusCode.NOT_FOUND and err.message == "no model"
    assert str(err) == "NOT_FOUND: no model"


def test_error_events():
    assert event_error({"choices": []}) is None
    err = event_error({"error": {"message": "too long", "type": "BadRequestError", "code": 400}})
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.message == "too long"
    legacy = event_error({"object": "error", "message": "boom", "code": 500})
    assert legacy.code == grpc.StatusCode.INTERNAL and legacy.message == "boom"


# --- streamed and unary replies -----------------------------------------------------------------

def _chunk(content=None, role=None, finish=None, usage=None, choices=True):
    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    return {"id": "chatcmpl-1", "model": "m", "created": 123,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else [],
            "usage": usage}


def test_sse_events_reads_single_and_batched_writes():
    import json

    a, b = _chunk("x"), _chunk("y")
    one = f"data: {json.dumps(a)}\n\n"
    assert list(sse_events(one)) == [a]
    assert list(sse_events([one, f"data: {json.dumps(b)}\n\ndata: [DONE]\n\n"])) == [a, b]
    assert list(sse_events("data: [DONE]\n\n")) == []


def test_stream_translator_one_message_per_generated_chunk_then_final():
    t = StreamTranslator()
    out = []
    # The opening chunk holds only the role; then one chunk per token, one of them without text
    # yet (a token that ends inside a UTF-8 character); the last carries the finish reason.
    for event in [_chunk("", role="assistant"), _chunk("Hel"), _chunk(""), _chunk("lo", finish="length"),
                  _chunk(choices=False, usage={"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8})]:
        out += t.feed(event)
    assert [c.delta for c in out] == ["Hel", "", "lo"]
    assert [c.role for c in out] == ["assistant", "", ""]
    assert all(c.id == "chatcmpl-1" and c.model == "m" and c.created == 123 for c in out)
    assert not any(c.HasField("usage") or c.finish_reason for c in out)
    final = t.final()
    assert final.delta == "" and final.finish_reason == "length" and final.HasField("usage")
    assert (final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.total_tokens) == (5, 3, 8)
    # A delta without content (no token: vLLM's empty DeltaMessage) is not a generated chunk.
    assert StreamTranslator().feed({"choices": [{"delta": {}, "finish_reason": None}]}) == []


def test_stream_translator_text_and_finish_in_one_chunk():
    t = StreamTranslator()
    assert [c.delta for c in t.feed(_chunk("end", finish="stop"))] == ["end"]
    assert t.final().finish_reason == "stop"


def test_stream_translator_raises_a_mid_stream_error():
    t = StreamTranslator()
    t.feed(_chunk("a"))
    with pytest.raises(GrpcError) as info:
        t.feed({"error": {"message": "engine died", "type": "InternalServerError", "code": 500}})
    assert info.value.code == grpc.StatusCode.INTERNAL


def test_completion_message():
    msg = completion_message({"id": "c1", "model": "m", "created": 9,
                              "choices": [{"message": {"role": "assistant", "content": "hey"}, "finish_reason": "stop"}],
                              "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
    assert (msg.id, msg.model, msg.created, msg.message.role, msg.message.content, msg.finish_reason) == (
        "c1", "m", 9, "assistant", "hey", "stop")
    assert msg.usage.total_tokens == 4


# --- access -------------------------------------------------------------------------------------

@pytest.mark.parametrize("peer, host, loopback", [
    ("ipv4:127.0.0.1:5000", "127.0.0.1", True),
    ("ipv6:[::1]:5000", "::1", True),
    ("ipv6:[::ffff:127.0.0.1]:5000", "::ffff:127.0.0.1", True),
    ("ipv4:10.0.0.7:5000", "10.0.0.7", False),
    ("ipv6:[2001:db8::1]:443", "2001:db8::1", False),
    ("unix:/tmp/sock", "unix", True),
])
def test_peer_addresses(peer, host, loopback):
    assert peer_host(peer) == host and is_loopback(host) is loopback


def test_loopback_only_refuses_other_hosts():
    access = GrpcAccess(loopback_only=True)
    access.check("ipv4:127.0.0.1:1", [])
    with pytest.raises(GrpcError) as info:
        access.check("ipv4:10.1.2.3:1", [])
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED and "loopback" in info.value.message
    GrpcAccess(loopback_only=False).check("ipv4:10.1.2.3:1", [])


def test_api_keys():
    access = GrpcAccess.from_config(GrpcConfig(api_keys_env="KEYS"), environ={"KEYS": "k1, k2"})
    assert len(access.api_key_sha256) == 2 and "k1" not in str(access.to_kwargs())
    assert GrpcAccess.from_kwargs(access.to_kwargs()) == access
    peer = "ipv4:127.0.0.1:1"
    access.check(peer, [("authorization", "Bearer k2")])
    access.check(peer, [("Authorization", b"bearer k1")])
    for metadata, words in [([], "missing API key"), ([("authorization", "k1")], "malformed"),
                            ([("authorization", "Bearer nope")], "invalid API key")]:
        with pytest.raises(GrpcError) as info:
            access.check(peer, metadata)
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and words in info.value.message
    # No keys configured: no authentication.
    GrpcAccess().check(peer, [])


def test_a_named_but_empty_key_variable_is_an_error():
    assert api_key_digests_from_env(None, {}) == ()
    for environ in ({}, {"KEYS": " , "}):
        with pytest.raises(ValueError, match="serve.grpc.api_keys_env names 'KEYS'"):
            api_key_digests_from_env("KEYS", environ)


# --- config and manifests -----------------------------------------------------------------------

def test_grpc_config_defaults_and_errors():
    cfg = parse_config({})
    assert cfg.serve.grpc == GrpcConfig()
    assert (cfg.serve.grpc.enabled, cfg.serve.grpc.host, cfg.serve.grpc.port) == (False, "127.0.0.1", 9000)
    with pytest.raises(ConfigError, match="serve.grpc.prot"):
        parse_config({"serve": {"grpc": {"prot": 1}}})
    with pytest.raises(ConfigError, match="serve.grpc.port"):
        parse_config({"serve": {"grpc": {"port": 0}}})


def test_grpc_options_and_ingress_kwargs():
    from orchestrator.serving.app import grpc_options, ingress_kwargs

    assert grpc_options(parse_config({})) is None
    opts = grpc_options(parse_config({"serve": {"grpc": {"enabled": True, "port": 9123}}}))
    assert opts.port == 9123 and opts.grpc_servicer_functions == [SERVICER_FUNCTION] and opts.enable_reflection
    [func] = opts.grpc_servicer_func_callable  # importable, as Serve's proxy imports it
    assert func is chat_pb2_grpc.add_ChatServiceServicer_to_server
    assert ingress_kwargs(parse_config({})) == {"grpc_access": {"loopback_only": True, "api_key_sha256": []},
                                                "http_access": {"grants": [], "loopback_only": True}}
    open_cfg = parse_config({"serve": {"grpc": {"host": "0.0.0.0"}, "auth": {"allow_remote_without_keys": True}}})
    assert ingress_kwargs(open_cfg)["grpc_access"]["loopback_only"] is False


def _serve_grpc(serve_cfg: dict, colocate_cfg) -> None:
    opts = serve_cfg["grpc_options"]
    assert opts["grpc_servicer_functions"] == [SERVICER_FUNCTION]
    assert opts["port"] == colocate_cfg.serve.grpc.port
    assert opts.get("enable_reflection", True)


def test_manifests_enable_the_grpc_service():
    from orchestrator.config import load_config

    serve_cfg = yaml.safe_load((ROOT / "manifests" / "serve.yaml").read_text())
    _serve_grpc(serve_cfg, load_config(ROOT / "manifests" / "colocate.yaml"))
    doc = next(yaml.safe_load_all((ROOT / "manifests" / "kuberay-rayservice.yaml").read_text()))
    gpu = load_config(ROOT / "manifests" / "colocate-gpu.yaml")
    _serve_grpc(yaml.safe_load(doc["spec"]["serveConfigV2"]), gpu)
    assert gpu.serve.grpc.host == "0.0.0.0"  # clients come through the pod network
    ports = [p["containerPort"] for p in doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
             ["containers"][0]["ports"]]
    assert gpu.serve.grpc.port in ports


def test_grpc_vs_http_bench_summary():
    from bench.grpc_vs_http import Timing, _timing, format_table, summarize

    t = _timing("grpc", 0, 1.0, [1.1, 1.12, 1.14], 3)
    assert round(t.ttft_ms, 6) == 100.0 and round(t.tpot_ms, 6) == 20.0 and t.num_chunks == 3
    # Two tokens in one chunk: TPOT is per token, not per chunk.
    assert round(_timing("http", 0, 1.0, [1.1, 1.14], 3).tpot_ms, 6) == 20.0
    timings = [t, Timing("http", 0, 110.0, 21.0, 3, 3), Timing("http", 1, 130.0, 23.0, 3, 3)]
    summary = summarize(timings)
    assert summary["grpc"]["n"] == 1 and summary["http"]["ttft_p50_ms"] == 120.0
    table = format_table(summary)
    assert "gRPC (grpcio aio)" in table and "HTTP (openai SSE)" in table and "TTFT p50 -20.0 ms" in table
