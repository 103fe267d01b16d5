"""How `daert serve context` builds this service."""

from daert.context.config import ContextSettings
from daert.context.service import ContextServicer
from daert.runtime.service import ServiceSpec

SPEC = ServiceSpec(
    name="context",
    settings=ContextSettings,
    create=ContextServicer,
    example_method="daert.v1.ContextService/CountTokens",
    example_request='{"messages": [{"role": "ROLE_SYSTEM", "content": "You are terse."}, '
    '{"role": "ROLE_USER", "content": "How many tokens is this?"}]}',
    # Its tokenizer may be an LLM server outside the stack (the embedded one when it runs).
    external_backends=True,
)
