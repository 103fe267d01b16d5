"""How `daert serve generation` builds this service."""

from daert.generation.config import GenerationSettings
from daert.generation.service import GenerationServicer
from daert.runtime.service import ServiceSpec

SPEC = ServiceSpec(
    name="generation",
    settings=GenerationSettings,
    create=GenerationServicer,
    example_method="daert.v1.GenerationService/Generate",
    example_request='{"messages": [{"role": "ROLE_USER", "content": "Say hello in five words."}], '
    '"params": {"temperature": 0, "max_tokens": 32}}',
    external_backends=True,
)
