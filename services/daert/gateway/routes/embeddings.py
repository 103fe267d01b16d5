"""POST /v1/embeddings: the embedding service's vectors, as floats or base64 (little-endian
float32, what the openai SDK decodes)."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from daert.gateway.errors import bad_request, not_found
from daert.gateway.schemas import EmbeddingRequest
from daert.gateway.state import Authenticated, gateway
from daert.v1 import embedding_pb2

router = APIRouter(tags=["embeddings"])


@router.post("/v1/embeddings")
async def embeddings(
    body: EmbeddingRequest, request: Request, caller: Authenticated
) -> JSONResponse:
    state = gateway(request)
    inputs = [body.input] if isinstance(body.input, str) else body.input
    if not inputs:
        raise bad_request("input", "at least one input is required")
    if not all(isinstance(item, str) for item in inputs):
        raise bad_request("input", "token arrays are not supported: send text")
    caller.require_model(body.model)
    if await state.catalog.find_embedding(body.model) is None:
        raise not_found(
            f"the embedding model {body.model!r} does not exist; GET /v1/models lists them",
            "model",
            "model_not_found",
        )
    request.state.param_renames = {"inputs": "input"}
    reply = await state.clients.embedding.stub.Embed(
        embedding_pb2.EmbedRequest(
            inputs=[str(item) for item in inputs],
            model=body.model,
            input_type=embedding_pb2.INPUT_TYPE_DOCUMENT,
            dimensions=body.dimensions or 0,
        )
    )
    state.record_usage(caller, reply.usage.prompt_tokens)
    data: list[dict[str, Any]] = []
    for index, vector in enumerate(reply.embeddings):
        values: Any = list(vector.values)
        if body.encoding_format == "base64":
            values = base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()
        data.append({"object": "embedding", "index": index, "embedding": values})
    tokens = reply.usage.prompt_tokens
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": reply.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )
