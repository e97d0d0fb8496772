"""The OpenAI ingress in front of the replicas: Ray's, with OpenAI-shaped errors everywhere, and
the gRPC service `colocate.v1.ChatService` (Serve's gRPC proxy calls `Chat` and `Complete`)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import grpc
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from orchestrator.compat import ray_api
from orchestrator.compat.ray_api import add_ingress_error_handlers, openai_http_exception, openai_ingress_base
from orchestrator.serving.auth import HttpAccess, Refusal, body_json
from orchestrator.serving.grpc_api import chat_pb2
from orchestrator.serving.grpc_api.convert import (
    GrpcAccess,
    GrpcError,
    StreamTranslator,
    completion_message,
    grpc_code,
    request_body,
    sse_events,
    validation_message,
)

CHAT_METHOD = "chat"
"""The replica method both routes call (`ColocateLLMServer.chat`)."""


def _openai_error(status_code: int, message: str, param: str | None = None) -> JSONResponse:
    kind = ("NotFoundError" if status_code == 404 else "BadRequestError" if status_code < 500
            else "InternalServerError")
    return JSONResponse(status_code=status_code,
                        content={"error": {"message": message, "type": kind, "param": param, "code": status_code}})


async def invalid_body(request, exc: RequestValidationError) -> JSONResponse:
    """A body that does not parse into the route's request model: 400, naming the field and the
    reason (never echoing the input, which may be bytes or huge)."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ("body",)))
    return _openai_error(400, f"invalid request: {first.get('msg', 'the body does not parse')} at {where}", where)


async def undecodable_body(request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own errors (a body it cannot decode, an unknown route, a wrong method)."""
    return _openai_error(exc.status_code, str(exc.detail))


_BODY_ROUTES = ("/v1/chat/completions", "/v1/completions")
_http_access = HttpAccess()
"""This process's access rules: set by the ingress replica's constructor (the FastAPI app and
its middleware are built, and pickled, in the process that builds the application)."""


class AccessMiddleware:
    """ASGI middleware in front of every route: the API key (401), the client's host on an
    unkeyed endpoint (403), and the request class the key allows (403, or the key's class put
    into a body that names none). Nothing is read or rewritten on an unkeyed loopback call."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        access = _http_access
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        client = scope.get("client")
        try:
            grant = access.authenticate(headers.get("authorization"), client[0] if client else None)
            if grant is None or scope.get("method") != "POST" or scope.get("path") not in _BODY_ROUTES:
                return await self.app(scope, receive, send)
            raw = await _read_body(receive)
            body = body_json(raw)
            bound = access.bind_class(grant, body)
        except Refusal as refusal:
            return await JSONResponse(status_code=refusal.status_code, content=refusal.body())(scope, receive, send)
        if bound is not body:
            raw = json.dumps(bound).encode()
            scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers", ())
                                          if k.lower() != b"content-length"]
                     + [(b"content-length", str(len(raw)).encode())]}
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()  # after the body: the client's disconnect

        return await self.app(scope, replay, send)


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


add_ingress_error_handlers({RequestValidationError: invalid_body, StarletteHTTPException: undecodable_body},
                           middleware=(AccessMiddleware,))


class ColocateIngress(openai_ingress_base()):
    """Ray's ingress answers an unknown model with FastAPI's `{"detail": ...}`; OpenAI clients
    expect `{"error": {"message", "type", "code"}}`, which the ingress's error middleware writes
    for OpenAIHTTPException.

    Over gRPC, `Chat` (server-streaming) and `Complete` (unary) turn the request message into
    the body the HTTP route parses and send it down the same path (`_get_response`: the model
    lookup, the handle to the replicas, `ColocateLLMServer.chat`), so it is classed, scheduled,
    budgeted, counted and timed like an HTTP request. Errors end the call with a gRPC status."""

    def __init__(self, *args: Any, grpc_access: dict[str, Any] | None = None,
                 http_access: dict[str, Any] | None = None, **kwargs: Any) -> None:
        global _http_access
        super().__init__(*args, **kwargs)
        self._grpc_access = GrpcAccess.from_kwargs(grpc_access)
        _http_access = HttpAccess.from_kwargs(http_access)

    async def _get_model_id(self, model):
        try:
            return await super()._get_model_id(model)
        except HTTPException as err:
            kind = "NotFoundError" if err.status_code == 404 else "BadRequestError"
            raise openai_http_exception(err.status_code, str(err.detail), kind) from None

    # --- gRPC -----------------------------------------------------------------------------------

    async def Chat(self, request: chat_pb2.ChatRequest, grpc_context=None) -> AsyncGenerator[chat_pb2.ChatChunk, None]:  # noqa: N802 - named like the RPC
        translator = StreamTranslator()
        try:
            async for item in self._grpc_replies(request, grpc_context, stream=True):
                for event in sse_events(item):
                    for chunk in translator.feed(event):
                        yield chunk
            yield translator.final()
        except GrpcError as err:
            _end_call(grpc_context, err)

    async def Complete(self, request: chat_pb2.ChatRequest, grpc_context=None) -> chat_pb2.ChatCompletion:  # noqa: N802 - named like the RPC
        try:
            replies = [item async for item in self._grpc_replies(request, grpc_context, stream=False)]
            if not replies:
                raise GrpcError(grpc.StatusCode.INTERNAL, "the replica sent no reply")
            reply = replies[0]
            return completion_message(reply.model_dump() if hasattr(reply, "model_dump") else reply)
        except GrpcError as err:
            _end_call(grpc_context, err)

    async def _grpc_replies(self, request: chat_pb2.ChatRequest, grpc_context, *, stream: bool):
        """What the replica answers for `request` (SSE strings or lists of them when streamed,
        the completion object when not), after the access check; errors as GrpcError."""
        if grpc_context is not None:  # None: called through a handle inside the cluster
            self._grpc_access.check(grpc_context.peer(), grpc_context.invocation_metadata())
        raw_body = request_body(request, stream=stream)
        if grpc_context is not None and _http_access.keyed:
            raw_body = _bind_grpc_caller(grpc_context, raw_body)
        try:
            body = ray_api.chat_completion_request_type().model_validate(raw_body)
        except ValidationError as err:
            raise GrpcError(grpc.StatusCode.INVALID_ARGUMENT, validation_message(err.errors())) from None
        error_type = ray_api.error_response_type()
        try:
            async for item in self._get_response(body=body, call_method=CHAT_METHOD):
                for obj in item if isinstance(item, list) else (item,):
                    if isinstance(obj, error_type):
                        raise GrpcError(grpc_code(obj.error.code), obj.error.message)
                yield item
        except ray_api.openai_http_exception_type() as err:
            raise GrpcError(grpc_code(err.status_code), err.message) from None
        except HTTPException as err:
            raise GrpcError(grpc_code(err.status_code), str(err.detail)) from None


def _bind_grpc_caller(grpc_context, body: dict[str, Any]) -> dict[str, Any]:
    """serve.auth's keys over gRPC too: the `authorization: Bearer <key>` metadata, and the
    request class the key allows (UNAUTHENTICATED / PERMISSION_DENIED otherwise)."""
    metadata = grpc_context.invocation_metadata() or ()
    values = [v for k, v in metadata if k.lower() == "authorization"]
    header = None
    if values:
        header = values[-1].decode() if isinstance(values[-1], bytes) else str(values[-1])
    try:
        grant = _http_access.authenticate(header, None)
        return _http_access.bind_class(grant, body)
    except Refusal as refusal:
        code = grpc.StatusCode.UNAUTHENTICATED if refusal.status_code == 401 else grpc.StatusCode.PERMISSION_DENIED
        raise GrpcError(code, refusal.message) from None


def _end_call(grpc_context, err: GrpcError):
    """End the call with err's status: Serve's proxy answers with the code set on the call's
    context when the method raises (the replica keeps serving)."""
    if grpc_context is not None:
        grpc_context.set_code(err.code)
        grpc_context.set_details(err.message)
    raise err
