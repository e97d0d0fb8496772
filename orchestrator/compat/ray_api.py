"""Every use of a Ray internal goes through this module.

Colocate builds on Ray's public APIs (Serve, Serve LLM's `LLMServer`/`build_openai_app`, Jobs,
actors) and, where those stop short, on a few private ones: Ray Serve LLM's ingress and engine
classes and its OpenAI request and error types (`ray.llm._internal`), a non-blocking `serve._run`, the GCS
key-value store (`ray.experimental.internal_kv`) and the job record a running job's message lives
in. They live here alone: the Ray version is checked once, at import, against the versions this
project was tested on, and everything else calls the functions below. Imports of the private
modules happen inside the functions, so importing this module stays cheap.

Set COLOCATE_ALLOW_UNTESTED_VERSIONS=1 to run on another version anyway (a warning is logged).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import ray

from orchestrator.compat.versions import check_tested
from orchestrator.names import ENV_ALLOW_UNTESTED

log = logging.getLogger(__name__)

TESTED_VERSIONS = ("2.60",)
"""Release lines (major.minor) of Ray tested here."""


def check_version(version: str, tested: tuple[str, ...] = TESTED_VERSIONS, allow_untested: bool = False) -> None:
    """Raise ImportError unless `version` is on a tested release line (or untested ones are allowed)."""
    check_tested("Ray", version, tested, "some of Ray Serve LLM's private classes and Ray internals", allow_untested)


RAY_VERSION = ray.__version__
check_version(RAY_VERSION, allow_untested=os.environ.get(ENV_ALLOW_UNTESTED) == "1")


# --- Ray Serve LLM ------------------------------------------------------------------------------

def head_node_resource() -> str:
    """The resource only the head node has (Ray's own name for it): an actor that asks for a
    sliver of it is placed on the head, where the operator's files are."""
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME

    return HEAD_NODE_RESOURCE_NAME


def openai_ingress_base() -> type:
    """Ray Serve LLM's OpenAI ingress class (the base of `orchestrator.serving.ingress`)."""
    from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress

    return OpenAiIngress


def vllm_engine_base() -> type:
    """Ray Serve LLM's vLLM engine wrapper (the base of the replica's engine class)."""
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine

    return VLLMEngine


def llm_callback_base() -> type:
    """Ray Serve LLM's engine start-up callback class (`LLMConfig.callback_config`), whose
    context decides whether the replica first runs its model-download task on every node."""
    from ray.llm._internal.common.callbacks.base import CallbackBase

    return CallbackBase


def vllm_engine_class(start_engine) -> type:
    """A subclass of Ray Serve LLM's VLLMEngine whose AsyncLLM is started by
    `start_engine(engine, engine_args, engine_config, placement_group, log_engine_metrics=...)`
    (Ray's own start offers no way to attach a stat logger)."""
    base = vllm_engine_base()

    class _Engine(base):
        def _start_async_llm_engine(self, vllm_engine_args, vllm_engine_config, placement_group):
            return start_engine(self, vllm_engine_args, vllm_engine_config, placement_group,
                                log_engine_metrics=self.llm_config.log_engine_metrics)

    return _Engine


def use_engine_class(server_cls: type, engine_cls: type) -> None:
    """Make an `LLMServer` subclass run `engine_cls` (Ray Serve LLM's private class attribute)."""
    server_cls._default_engine_cls = engine_cls


def server_engine(server):
    """The engine object an `LLMServer` runs (None before it has started)."""
    return getattr(server, "engine", None)


def server_model_id(server) -> str:
    """The model id an `LLMServer` serves."""
    return server._llm_config.model_id


def openai_http_exception(status_code: int, message: str, kind: str) -> Exception:
    """An error the ingress's middleware answers as `{"error": {"message", "type", "code"}}`."""
    from ray.llm._internal.serve.core.configs.openai_api_models import OpenAIHTTPException

    return OpenAIHTTPException(status_code=status_code, message=message, type=kind)


def error_response(message: str, code: int, kind: str = "BadRequestError", param: str | None = None) -> Any:
    """The error object an `LLMServer` method yields for the ingress to answer with `code`."""
    from ray.llm._internal.serve.core.configs.openai_api_models import ErrorInfo, ErrorResponse

    return ErrorResponse(error=ErrorInfo(message=message, type=kind, code=code, param=param))


def error_response_type() -> type:
    """The class of what `error_response` builds (an `LLMServer` method's error item)."""
    from ray.llm._internal.serve.core.configs.openai_api_models import ErrorResponse

    return ErrorResponse


def openai_http_exception_type() -> type:
    """The class of `openai_http_exception`'s errors (`status_code`, `message`, `type`)."""
    from ray.llm._internal.serve.core.configs.openai_api_models import OpenAIHTTPException

    return OpenAIHTTPException


def chat_completion_request_type() -> type:
    """The pydantic model the ingress's `/v1/chat/completions` route parses its body into."""
    from ray.llm._internal.serve.core.configs.openai_api_models import ChatCompletionRequest

    return ChatCompletionRequest


# --- Ray Serve ----------------------------------------------------------------------------------

def serve_run_nonblocking(app, *, name: str, route_prefix: str) -> None:
    """Submit an application and return at once (`serve.run` blocks without a timeout or
    progress; `colocate up` waits itself, with both)."""
    from ray import serve

    serve._run(app, name=name, route_prefix=route_prefix, _blocking=False)


# --- the GCS key-value store --------------------------------------------------------------------

def kv_get(key: bytes, namespace: str) -> bytes | None:
    from ray.experimental.internal_kv import _internal_kv_get

    return _internal_kv_get(key, namespace=namespace)


def kv_put(key: bytes, value: bytes, namespace: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key, value, overwrite=True, namespace=namespace)


def kv_del(key: bytes, namespace: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(key, namespace=namespace)


# --- Ray Jobs -----------------------------------------------------------------------------------

def publish_job_message(job_id: str, message: str) -> bool:
    """Set a RUNNING job's status message (`ray job status`, `ray job list`).

    Ray has no public call for a running job to set its own message, so this rewrites the
    `message` field of the job's record in the GCS, the same record Ray's job supervisor writes.
    It is safe because the supervisor writes that record only before the driver starts and after
    the driver's process tree has exited (`job_supervisor.py`, Ray 2.60), and it only ever touches
    a RUNNING job. Returns whether it was written."""
    from ray._private import ray_constants
    from ray.dashboard.modules.job.common import JobInfo, JobInfoStorageClient, JobStatus

    key = JobInfoStorageClient.JOB_DATA_KEY.format(job_id=job_id).encode()
    raw = kv_get(key, ray_constants.KV_NAMESPACE_JOB)
    if raw is None:
        return False
    info = JobInfo.from_json(json.loads(raw))
    if info.status != JobStatus.RUNNING:
        return False
    info.message = message
    kv_put(key, json.dumps(info.to_json()).encode(), ray_constants.KV_NAMESPACE_JOB)
    return True


def add_ingress_error_handlers(handlers: dict, middleware: tuple = ()) -> None:
    """Every FastAPI app Ray Serve LLM builds for an OpenAI ingress (`ingress.init()`, called by
    `make_fastapi_ingress` in the process that builds the application) also gets `handlers`
    (exception class -> handler), replacing Ray's for the same class. Ray's validation handler
    puts the offending input in its reply, so a body that is not JSON (bytes) made the reply
    itself fail (500); FastAPI's own HTTPException (a body it cannot decode) answers
    `{"detail": ...}`, not OpenAI's `{"error": ...}`. `middleware` (ASGI middleware classes)
    wraps the same app. Idempotent."""
    from ray.llm._internal.serve.core.ingress import ingress as ray_ingress

    if getattr(ray_ingress.init, "_colocate_handlers", None) is not None:
        return
    original = ray_ingress.init

    def init():
        app = original()
        for exc_class, handler in handlers.items():
            app.add_exception_handler(exc_class, handler)
        for cls in middleware:
            app.add_middleware(cls)
        return app

    init._colocate_handlers = handlers  # type: ignore[attr-defined]
    ray_ingress.init = init
