"""How `daert serve lora` builds this service."""

from daert.lora.config import LoraSettings
from daert.lora.service import LoraRouterServicer
from daert.runtime.service import ServiceSpec

SPEC = ServiceSpec(
    name="lora",
    settings=LoraSettings,
    create=LoraRouterServicer,
    example_method="daert.v1.LoraRouterService/ListReplicas",
    example_request="{}",
)
