"""POST /v1/rerank (and /rerank, /v2/rerank): the request and response shape of Cohere's and
Jina's rerank APIs, as vLLM and TEI serve it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from daert.gateway.schemas import RerankRequest
from daert.gateway.state import Authenticated, gateway
from daert.gateway.translate import completion_id
from daert.v1 import rerank_pb2

router = APIRouter(tags=["rerank"])


@router.post("/v1/rerank")
@router.post("/v2/rerank", include_in_schema=False)
@router.post("/rerank", include_in_schema=False)
async def rerank(body: RerankRequest, request: Request, caller: Authenticated) -> dict[str, Any]:
    state = gateway(request)
    if body.model:
        caller.require_model(body.model)
    texts = [d if isinstance(d, str) else d.text for d in body.documents]
    reply = await state.clients.rerank.stub.Rerank(
        rerank_pb2.RerankRequest(
            query=body.query, documents=texts, top_n=body.top_n or 0, model=body.model
        )
    )
    results = []
    for result in reply.results:
        entry: dict[str, Any] = {"index": result.index, "relevance_score": result.score}
        if body.return_documents:
            entry["document"] = {"text": texts[result.index]}
        results.append(entry)
    return {"id": completion_id("rerank"), "model": reply.model, "results": results}
