"""EmbeddingService: request validation and wiring; inference lives in `backends/`."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
import numpy as np

from daert.embedding.config import EmbeddingSettings
from daert.embedding.models import ServedModel, shape_vectors
from daert.runtime.errors import InvalidArgument, Unavailable
from daert.runtime.model_set import ModelSet
from daert.runtime.validation import require
from daert.v1 import common_pb2, embedding_pb2, embedding_pb2_grpc

log = logging.getLogger("daert.embedding")

QUERY = embedding_pb2.INPUT_TYPE_QUERY
TRUNCATE_MODES = {
    embedding_pb2.TRUNCATION_UNSPECIFIED: True,
    embedding_pb2.TRUNCATION_END: True,
    embedding_pb2.TRUNCATION_NONE: False,
}


class EmbeddingServicer(embedding_pb2_grpc.EmbeddingServiceServicer):
    def __init__(self, settings: EmbeddingSettings) -> None:
        self._settings = settings
        self._models = ModelSet({m.name: ServedModel(m, settings) for m in settings.models})

    # --- the runtime's Service protocol -------------------------------------------------

    def add_to_server(self, server: grpc.aio.Server) -> Sequence[str]:
        embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(self, server)
        return [embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name]

    async def start(self) -> None:
        await self._models.start()

    async def ready(self) -> bool:
        return await self._models.ready()

    async def close(self) -> None:
        await self._models.close()

    # --- RPCs ------------------------------------------------------------------------------

    async def Embed(
        self, request: embedding_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> embedding_pb2.EmbedResponse:
        model = self._models.get(request.model)
        texts = self._validated_texts(request)
        info = model.backend.info
        if info is None:
            raise Unavailable(f"model {model.config.name!r} is not ready yet")
        require(request.dimensions >= 0, "dimensions", "must be 0 (full) or positive")
        require(
            request.dimensions <= info.dimensions,
            "dimensions",
            f"{request.dimensions} is more than the model's {info.dimensions}",
        )
        truncate = TRUNCATE_MODES.get(request.truncation)
        require(truncate is not None, "truncation", f"unknown value {request.truncation}")
        require(
            request.input_type in embedding_pb2.InputType.values(),
            "input_type",
            f"unknown value {request.input_type}",
        )

        prefix = (
            model.config.query_prefix
            if request.input_type == QUERY
            else model.config.document_prefix
        )
        texts = [prefix + text for text in texts] if prefix else texts
        if not truncate:
            await self._reject_over_long(model, texts, info.max_input_tokens)

        rows = await model.batcher.submit(bool(truncate), texts)
        normalize = request.normalize if request.HasField("normalize") else True
        vectors = shape_vectors(np.stack([v for v, _ in rows]), request.dimensions, normalize)
        tokens = sum(n for _, n in rows)
        return embedding_pb2.EmbedResponse(
            embeddings=[common_pb2.Vector(values=row) for row in vectors.tolist()],
            model=model.config.name,
            dimensions=vectors.shape[1],
            usage=common_pb2.Usage(prompt_tokens=tokens, total_tokens=tokens),
        )

    async def ListModels(
        self,
        request: embedding_pb2.EmbeddingServiceListModelsRequest,
        context: grpc.aio.ServicerContext,
    ) -> embedding_pb2.EmbeddingServiceListModelsResponse:
        models = []
        for name, model in self._models.items():
            info = model.backend.info
            models.append(
                embedding_pb2.EmbeddingModel(
                    name=name,
                    dimensions=info.dimensions if info else 0,
                    max_input_tokens=info.max_input_tokens if info else 0,
                    backend=model.backend.kind,
                    is_default=name == self._models.default,
                    ready=model.ready,
                )
            )
        return embedding_pb2.EmbeddingServiceListModelsResponse(models=models)

    # --- helpers ---------------------------------------------------------------------------

    def _validated_texts(self, request: embedding_pb2.EmbedRequest) -> list[str]:
        texts = list(request.inputs)
        limit = self._settings.max_inputs_per_request
        require(len(texts) > 0, "inputs", "at least one text is required")
        require(len(texts) <= limit, "inputs", f"{len(texts)} texts; at most {limit} per request")
        for i, text in enumerate(texts):
            require(bool(text.strip()), f"inputs[{i}]", "must not be empty or blank")
        total = sum(len(t) for t in texts)
        max_chars = self._settings.max_request_chars
        require(
            total <= max_chars, "inputs", f"{total} characters; at most {max_chars} per request"
        )
        return texts

    async def _reject_over_long(self, model: ServedModel, texts: list[str], limit: int) -> None:
        counts = await model.backend.count_tokens(texts)
        for i, count in enumerate(counts or ()):
            if limit and count > limit:
                raise InvalidArgument(
                    f"inputs[{i}]",
                    f"{count} tokens; model {model.config.name!r} reads at most {limit} "
                    "(set truncation to TRUNCATION_END to cut it)",
                )
