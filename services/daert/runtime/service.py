"""What a service gives the runtime: a servicer, a readiness check and a lifecycle."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import grpc

from daert.runtime.settings import ServerSettings


class Service(Protocol):
    def add_to_server(self, server: grpc.aio.Server) -> Sequence[str]:
        """Register the servicer(s); return their full names (``daert.v1.EmbeddingService``)."""
        ...

    async def start(self) -> None:
        """Bring backends up (load models, open pools). Runs after the port is bound, so
        health answers NOT_SERVING meanwhile. Raising here stops the process."""
        ...

    async def ready(self) -> bool:
        """True when every backend the service needs can answer right now."""
        ...

    async def close(self) -> None:
        """Release backends; called once in-flight RPCs have drained."""
        ...


SettingsT = TypeVar("SettingsT", bound=ServerSettings)


@dataclass(frozen=True)
class ServiceSpec(Generic[SettingsT]):
    """How `daert serve <name>` builds a service: its settings class and its factory."""

    name: str
    settings: type[SettingsT]
    create: Callable[[SettingsT], Service]
    # What `daert up` prints as a first call to try: a method and a JSON request body.
    example_method: str = ""
    example_request: str = "{}"
    # True when its backends live outside the stack (generation's LLM servers): `daert up`
    # then does not wait for it to be SERVING, and the rest of the stack works without them.
    external_backends: bool = False
