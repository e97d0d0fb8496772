"""The OpenAI ingress in front of the replicas: Ray's, with OpenAI-shaped errors everywhere, and
the gRPC service `colocate.v1.ChatService` (Serve's gRPC proxy calls `Chat` and `Complete`)."""

from __future__ import annotations

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


add_ingress_error_handlers({RequestValidationError: invalid_body, StarletteHTTPException: undecodable_body})


class ColocateIngress(openai_ingress_base()):
    """Ray's ingress answers an unknown model with FastAPI's `{"detail": ...}`; OpenAI clients
    expect `{"error": {"message", "type", "code"}}`, which the ingress's error middleware writes
    for OpenAIHTTPException.

    Over gRPC, `Chat` (server-streaming) and `Complete` (unary) turn the request message into
    the body the HTTP route parses and send it down the same path (`_get_response`: the model
    lookup, the handle to the replicas, `ColocateLLMServer.chat`), so it is classed, scheduled,
    budgeted, counted and timed like an HTTP request. Errors end the call with a gRPC status."""

    def __init__(self, *args: Any, grpc_access: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._grpc_access = GrpcAccess.from_kwargs(grpc_access)

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
        try:
            body = ray_api.chat_completion_request_type().model_validate(request_body(request, stream=stream))
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


def _end_call(grpc_context, err: GrpcError):
    """End the call with err's status: Serve's proxy answers with the code set on the call's
    context when the method raises (the replica keeps serving)."""
    if grpc_context is not None:
        grpc_context.set_code(err.code)
        grpc_context.set_details(err.message)
    raise err
