"""GET /v1/models and /v1/models/{id}: the generation models, the LoRA adapters the key's
tenant may use, and the embedding models, limited to what the key allows."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from daert.gateway.catalog import CatalogModel
from daert.gateway.errors import not_found
from daert.gateway.state import Authenticated, gateway

router = APIRouter(tags=["models"])


def _entry(model: CatalogModel) -> dict[str, Any]:
    return {"id": model.id, "object": "model", "created": 0, "owned_by": model.owned_by}


@router.get("/v1/models")
async def list_models(request: Request, caller: Authenticated) -> dict[str, Any]:
    models = await gateway(request).catalog.all_models(caller.tenant)
    return {
        "object": "list",
        "data": [_entry(m) for m in models if caller.key.allows_model(m.id)],
    }


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request, caller: Authenticated) -> dict[str, Any]:
    models = await gateway(request).catalog.all_models(caller.tenant)
    for model in models:
        if model.id == model_id and caller.key.allows_model(model.id):
            return _entry(model)
    raise not_found(f"the model {model_id!r} does not exist", "model", "model_not_found")
