"""Between `colocate.v1` messages and the OpenAI chat request/response the HTTP route handles.

Pure functions (no Ray, no vLLM): the ingress (`orchestrator.serving.ingress`) calls them around
the same internal path an HTTP request takes, so a gRPC request is classed, scheduled, budgeted,
counted and timed by the same replica code. Errors are `GrpcError`s carrying a status code.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from orchestrator.request_class import REQUEST_CLASS_FIELD
from orchestrator.serving.grpc_api import chat_pb2

API_KEY_METADATA = "authorization"
"""Clients send `authorization: Bearer <key>` in the call's metadata, as over HTTP."""

# How an HTTP status the OpenAI path answers with reads as a gRPC status (the usual mapping,
# https://github.com/grpc/grpc/blob/master/doc/http-grpc-status-mapping.md, for the codes this
# path produces; 400 and 422 are the request's fault: INVALID_ARGUMENT).
_HTTP_TO_GRPC = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class GrpcError(Exception):
    """A call that ends with `code` and `message` (the status details the client sees)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self):  # it crosses from the ingress replica to Serve's proxy
        return (type(self), (self.code, self.message))

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def grpc_code(http_status: int | None) -> grpc.StatusCode:
    """The gRPC status for an HTTP status of the OpenAI path."""
    if http_status is None:
        return grpc.StatusCode.UNKNOWN
    code = _HTTP_TO_GRPC.get(int(http_status))
    if code is not None:
        return code
    if 400 <= http_status < 500:
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL if http_status >= 500 else grpc.StatusCode.UNKNOWN


# --- request ------------------------------------------------------------------------------------

def request_body(request: chat_pb2.ChatRequest, *, stream: bool) -> dict[str, Any]:
    """The OpenAI chat request body the HTTP route would have received for `request`.

    Unset optional fields are left out (the server's defaults apply, as for an absent JSON
    field); the request class goes in the same body field HTTP clients use, so the replica reads
    it in the same place. A streamed call asks for usage in the last chunk."""
    if not request.messages:
        raise GrpcError(grpc.StatusCode.INVALID_ARGUMENT, "messages: at least one message is required")
    body: dict[str, Any] = {
        "model": request.model or None,  # empty: the only model served, as Ray's ingress does for None
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        "stream": stream,
    }
    for field in ("max_tokens", "temperature", "top_p", "seed"):
        if request.HasField(field):
            body[field] = getattr(request, field)
    if request.stop:
        body["stop"] = list(request.stop)
    if request.request_class:
        body[REQUEST_CLASS_FIELD] = request.request_class
    if request.ignore_eos:
        body["ignore_eos"] = True
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def validation_message(errors: Iterable[Mapping[str, Any]]) -> str:
    """One line per pydantic error, `field.path: reason`, like the config's errors."""
    return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())) or '<request>'}: {e.get('msg', '')}"
                     for e in errors)


# --- streamed response --------------------------------------------------------------------------

def sse_events(item: str | Iterable[str]) -> Iterator[dict[str, Any]]:
    """The JSON events in what a replica streams: server-sent-event strings (`data: {...}\\n\\n`),
    one or a list of them (Serve LLM's stream batching); `data: [DONE]` is skipped."""
    for text in ([item] if isinstance(item, str) else item):
        for part in text.split("\n\n"):
            part = part.strip()
            if not part.startswith("data:"):
                continue
            payload = part[len("data:"):].strip()
            if payload and payload != "[DONE]":
                yield json.loads(payload)


def event_error(event: Mapping[str, Any]) -> GrpcError | None:
    """The error an event carries (vLLM streams `{"error": {...}}` when a request fails mid-stream)."""
    err = event.get("error") if isinstance(event.get("error"), Mapping) else None
    if err is None and event.get("object") == "error":
        err = event
    if err is None:
        return None
    code = err.get("code")
    return GrpcError(grpc_code(code if isinstance(code, int) else None), str(err.get("message") or err))


def usage_message(usage: Mapping[str, Any] | None) -> chat_pb2.Usage:
    usage = usage or {}
    return chat_pb2.Usage(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                          completion_tokens=int(usage.get("completion_tokens") or 0),
                          total_tokens=int(usage.get("total_tokens") or 0))


class StreamTranslator:
    """OpenAI chat completion chunks in, `ChatChunk`s out: one per generated chunk, then
    `final()` with the finish reason and usage.

    vLLM streams one chunk per engine output (a token, whose text may be empty while it ends
    inside a UTF-8 character), opened by a chunk that carries only the role; that one is not a
    generated chunk: its role goes on the first generated one."""

    def __init__(self) -> None:
        self.id = ""
        self.model = ""
        self.created = 0
        self.finish_reason = ""
        self.usage: Mapping[str, Any] | None = None
        self._role = "assistant"
        self._role_sent = False
        self.num_chunks = 0

    def feed(self, event: Mapping[str, Any]) -> list[chat_pb2.ChatChunk]:
        if (err := event_error(event)) is not None:
            raise err
        self.id = event.get("id") or self.id
        self.model = event.get("model") or self.model
        self.created = int(event.get("created") or self.created)
        if event.get("usage"):
            self.usage = event["usage"]
        out = []
        for choice in event.get("choices") or ():
            delta = choice.get("delta") or {}
            text = delta.get("content") or ""
            if delta.get("role") and not text and not self._role_sent:
                self._role = delta["role"]  # the opening chunk: no token in it
            elif "content" in delta:
                role = "" if self._role_sent else (delta.get("role") or self._role)
                self._role_sent = True
                out.append(chat_pb2.ChatChunk(id=self.id, model=self.model, created=self.created,
                                              delta=text, role=role))
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        self.num_chunks += len(out)
        return out

    def final(self) -> chat_pb2.ChatChunk:
        return chat_pb2.ChatChunk(id=self.id, model=self.model, created=self.created,
                                  finish_reason=self.finish_reason, usage=usage_message(self.usage))


def completion_message(response: Mapping[str, Any]) -> chat_pb2.ChatCompletion:
    """A non-streamed OpenAI chat completion (as a dict) as a `ChatCompletion`."""
    if (err := event_error(response)) is not None:
        raise err
    choices = response.get("choices") or [{}]
    choice = choices[0]
    message = choice.get("message") or {}
    return chat_pb2.ChatCompletion(
        id=response.get("id") or "", model=response.get("model") or "", created=int(response.get("created") or 0),
        message=chat_pb2.ChatMessage(role=message.get("role") or "assistant", content=message.get("content") or ""),
        finish_reason=choice.get("finish_reason") or "", usage=usage_message(response.get("usage")))


# --- access -------------------------------------------------------------------------------------

def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def api_key_digests_from_env(env_name: str | None, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """SHA-256 digests of the API keys in environment variable `env_name` (comma- or
    whitespace-separated). None: no keys, no authentication. A named variable that is unset or
    holds no key is an error: a typo must not turn authentication off."""
    if env_name is None:
        return ()
    environ = os.environ if environ is None else environ
    keys = [k for k in environ.get(env_name, "").replace(",", " ").split() if k]
    if not keys:
        raise ValueError(f"serve.grpc.api_keys_env names {env_name!r}, which is unset or holds no key "
                         "(comma- or space-separated API keys)")
    return tuple(sorted({key_digest(k) for k in keys}))


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string (`ipv4:127.0.0.1:5000`, `ipv6:[::1]:5000`, `unix:...`)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest[1:rest.index("]")] if rest.startswith("[") and "]" in rest else rest.rsplit(":", 1)[0]
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return kind  # unix, unix-abstract, or a kind not known here (not loopback)


def is_loopback(host: str) -> bool:
    if host in ("localhost", "unix", "unix-abstract"):
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


@dataclass(frozen=True)
class GrpcAccess:
    """Who may call the service: loopback clients only (when the configured host is a loopback
    address; Serve's gRPC proxy listens on every interface, so this is enforced per call), and
    only with one of the API keys (when any are configured; digests only, never the keys)."""

    loopback_only: bool = True
    api_key_sha256: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, grpc_config, environ: Mapping[str, str] | None = None) -> GrpcAccess:
        """From a `GrpcConfig` (orchestrator.config); reads the API keys' variable now."""
        return cls(loopback_only=is_loopback(grpc_config.host),
                   api_key_sha256=api_key_digests_from_env(grpc_config.api_keys_env, environ))

    def to_kwargs(self) -> dict[str, Any]:
        return {"loopback_only": self.loopback_only, "api_key_sha256": list(self.api_key_sha256)}

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any] | None) -> GrpcAccess:
        kwargs = kwargs or {}
        return cls(loopback_only=bool(kwargs.get("loopback_only", True)),
                   api_key_sha256=tuple(kwargs.get("api_key_sha256", ())))

    def check(self, peer: str, metadata: Iterable[tuple[str, Any]]) -> None:
        """Raise GrpcError (PERMISSION_DENIED, UNAUTHENTICATED) unless this call may go on."""
        if self.loopback_only and not is_loopback(peer_host(peer)):
            raise GrpcError(grpc.StatusCode.PERMISSION_DENIED,
                            f"this gRPC endpoint serves loopback clients only (serve.grpc.host is a loopback "
                            f"address); {peer} is not one")
        if not self.api_key_sha256:
            return
        values = [v for k, v in metadata if k.lower() == API_KEY_METADATA]
        if not values:
            raise GrpcError(grpc.StatusCode.UNAUTHENTICATED,
                            f"missing API key: send metadata '{API_KEY_METADATA}: Bearer <key>'")
        value = values[-1].decode() if isinstance(values[-1], bytes) else str(values[-1])
        scheme, _, key = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise GrpcError(grpc.StatusCode.UNAUTHENTICATED,
                            f"malformed '{API_KEY_METADATA}' metadata: expected 'Bearer <key>'")
        digest = key_digest(key.strip())
        # Every digest is compared, so the time taken does not tell which one was close.
        if not any([hmac.compare_digest(digest, d) for d in self.api_key_sha256]):
            raise GrpcError(grpc.StatusCode.UNAUTHENTICATED, "invalid API key")
