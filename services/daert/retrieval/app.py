"""How `daert serve retrieval` builds this service."""

from daert.retrieval.config import RetrievalSettings
from daert.retrieval.service import RetrievalServicer
from daert.runtime.service import ServiceSpec

SPEC = ServiceSpec(
    name="retrieval",
    settings=RetrievalSettings,
    create=RetrievalServicer,
    example_method="daert.v1.RetrievalService/ListCollections",
    example_request="{}",
)
