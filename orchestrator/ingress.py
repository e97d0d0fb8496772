"""The OpenAI ingress in front of the replicas: Ray's, with OpenAI-shaped errors everywhere."""

from __future__ import annotations

from fastapi import HTTPException
from ray.llm._internal.serve.core.configs.openai_api_models import OpenAIHTTPException
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress


class ColocateIngress(OpenAiIngress):
    """Ray's ingress answers an unknown model with FastAPI's `{"detail": ...}`; OpenAI clients
    expect `{"error": {"message", "type", "code"}}`, which the ingress's error middleware writes
    for OpenAIHTTPException."""

    async def _get_model_id(self, model):
        try:
            return await super()._get_model_id(model)
        except HTTPException as err:
            kind = "NotFoundError" if err.status_code == 404 else "BadRequestError"
            raise OpenAIHTTPException(status_code=err.status_code, message=str(err.detail), type=kind) from None
