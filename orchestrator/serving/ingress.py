"""The OpenAI ingress in front of the replicas: Ray's, with OpenAI-shaped errors everywhere."""

from __future__ import annotations

from fastapi import HTTPException

from orchestrator.compat.ray_api import openai_http_exception, openai_ingress_base


class ColocateIngress(openai_ingress_base()):
    """Ray's ingress answers an unknown model with FastAPI's `{"detail": ...}`; OpenAI clients
    expect `{"error": {"message", "type", "code"}}`, which the ingress's error middleware writes
    for OpenAIHTTPException."""

    async def _get_model_id(self, model):
        try:
            return await super()._get_model_id(model)
        except HTTPException as err:
            kind = "NotFoundError" if err.status_code == 404 else "BadRequestError"
            raise openai_http_exception(err.status_code, str(err.detail), kind) from None
