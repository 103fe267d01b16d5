"""How `daert serve rerank` builds this service."""

from daert.rerank.config import RerankSettings
from daert.rerank.service import RerankServicer
from daert.runtime.service import ServiceSpec

SPEC = ServiceSpec(
    name="rerank",
    settings=RerankSettings,
    create=RerankServicer,
    example_method="daert.v1.RerankService/Rerank",
    example_request='{"query": "how do I rotate API keys?", "documents": '
    '["Open Settings > API keys and click Rotate.", "The cat sat on the mat."]}',
)
