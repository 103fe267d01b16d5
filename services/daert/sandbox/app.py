"""How `daert serve sandbox` builds this service."""

from daert.runtime.service import ServiceSpec
from daert.sandbox.config import SandboxSettings
from daert.sandbox.service import SandboxServicer

SPEC = ServiceSpec(
    name="sandbox",
    settings=SandboxSettings,
    create=SandboxServicer,
    example_method="daert.v1.SandboxService/Execute",
    example_request='{"code": "import sys; print(sys.version); 6 * 7"}',
)
