"""Typed async clients for the daert services: deadline on every call, retries on
UNAVAILABLE through the gRPC service config, and request-id propagation.

    async with EmbeddingClient() as client:          # DAERT_EMBEDDING_TARGET or localhost:50052
        vectors = await client.embed_texts(["hello"])
        reply = await client.stub.ListModels(EmbeddingServiceListModelsRequest())
"""

from daert.clients.base import ServiceClient, field_violations, precondition_subjects
from daert.clients.embedding import EmbeddingClient
from daert.clients.services import (
    ContextClient,
    GenerationClient,
    LoraRouterClient,
    RerankClient,
    RetrievalClient,
    SandboxClient,
)

__all__ = [
    "ContextClient",
    "EmbeddingClient",
    "GenerationClient",
    "LoraRouterClient",
    "RerankClient",
    "RetrievalClient",
    "SandboxClient",
    "ServiceClient",
    "field_violations",
    "precondition_subjects",
]
