"""How `daert serve embedding` builds this service."""

from daert.embedding.config import EmbeddingSettings
from daert.embedding.service import EmbeddingServicer
from daert.runtime.service import ServiceSpec

SPEC = ServiceSpec(
    name="embedding",
    settings=EmbeddingSettings,
    create=EmbeddingServicer,
    example_method="daert.v1.EmbeddingService/Embed",
    example_request='{"inputs": ["hello world"], "dimensions": 8}',
)
