"""RerankService: request validation and wiring; scoring lives in `backends/`."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from daert.rerank.config import RerankSettings
from daert.rerank.models import ServedModel, ranked
from daert.runtime.errors import Unavailable
from daert.runtime.model_set import ModelSet
from daert.runtime.validation import require
from daert.v1 import common_pb2, rerank_pb2, rerank_pb2_grpc


class RerankServicer(rerank_pb2_grpc.RerankServiceServicer):
    def __init__(self, settings: RerankSettings) -> None:
        self._settings = settings
        self._models = ModelSet({m.name: ServedModel(m, settings) for m in settings.models})

    # --- the runtime's Service protocol -------------------------------------------------

    def add_to_server(self, server: grpc.aio.Server) -> Sequence[str]:
        rerank_pb2_grpc.add_RerankServiceServicer_to_server(self, server)
        return [rerank_pb2.DESCRIPTOR.services_by_name["RerankService"].full_name]

    async def start(self) -> None:
        await self._models.start()

    async def ready(self) -> bool:
        return await self._models.ready()

    async def close(self) -> None:
        await self._models.close()

    # --- RPCs ------------------------------------------------------------------------------

    async def Rerank(
        self, request: rerank_pb2.RerankRequest, context: grpc.aio.ServicerContext
    ) -> rerank_pb2.RerankResponse:
        model = self._models.get(request.model)
        documents = self._validated_documents(request, model)
        require(request.top_n >= 0, "top_n", "must be 0 (all) or positive")
        if model.backend.info is None:
            raise Unavailable(f"model {model.config.name!r} is not ready yet")

        limit = self._settings.max_document_chars
        scored = await model.backend.score(request.query, [d[:limit] for d in documents])
        results = [
            rerank_pb2.RerankResult(
                index=index,
                score=score,
                document=documents[index] if request.return_documents else "",
            )
            for index, score in ranked(scored.scores, request.top_n)
        ]
        tokens = scored.tokens or 0
        return rerank_pb2.RerankResponse(
            results=results,
            model=model.config.name,
            usage=common_pb2.Usage(prompt_tokens=tokens, total_tokens=tokens),
        )

    async def ListModels(
        self,
        request: rerank_pb2.RerankServiceListModelsRequest,
        context: grpc.aio.ServicerContext,
    ) -> rerank_pb2.RerankServiceListModelsResponse:
        models = []
        for name, model in self._models.items():
            info = model.backend.info
            models.append(
                rerank_pb2.RerankModel(
                    name=name,
                    backend=model.backend.kind,
                    max_documents=model.config.max_documents,
                    max_input_tokens=info.max_input_tokens if info else 0,
                    is_default=name == self._models.default,
                    ready=model.ready,
                )
            )
        return rerank_pb2.RerankServiceListModelsResponse(models=models)

    # --- helpers ---------------------------------------------------------------------------

    def _validated_documents(
        self, request: rerank_pb2.RerankRequest, model: ServedModel
    ) -> list[str]:
        require(bool(request.query.strip()), "query", "must not be empty or blank")
        documents = list(request.documents)
        limit = model.config.max_documents
        require(len(documents) > 0, "documents", "at least one document is required")
        require(
            len(documents) <= limit,
            "documents",
            f"{len(documents)} documents; model {model.config.name!r} takes at most {limit}",
        )
        for i, document in enumerate(documents):
            require(bool(document.strip()), f"documents[{i}]", "must not be empty or blank")
        total = len(request.query) + sum(len(d) for d in documents)
        max_chars = self._settings.max_request_chars
        require(
            total <= max_chars,
            "documents",
            f"{total} characters with the query; at most {max_chars} per request",
        )
        return documents
