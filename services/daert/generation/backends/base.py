"""The one small interface every inference-server backend implements."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from daert.generation.request import (
    Finished,
    GenerationInput,
    StreamEvent,
    TokenLogprob,
    ToolCall,
)
from daert.v1 import generation_pb2


@dataclass(frozen=True)
class UpstreamCall:
    """One request as a backend sends it."""

    input: GenerationInput
    model: str  # the name the server knows (Ollama tag, OpenAI `model`; vLLM: the adapter)
    adapter: str | None = None  # TGI / LoRAX `parameters.adapter_id`
    adapter_source: str | None = None  # LoRAX `parameters.adapter_source` ("hub", "local", "s3")


@dataclass(frozen=True)
class Completion:
    text: str
    finished: Finished
    tool_calls: tuple[ToolCall, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()


class GenerationBackend(Protocol):
    kind: generation_pb2.GenerationBackend.ValueType
    label: str  # "TGI": names the server kind in error messages
    url: str
    returns_logprobs: bool  # whether the server's wire format has token log probabilities

    def unsupported(self, request: GenerationInput) -> str | None:
        """Why this server cannot serve `request` (its input or output format); None when
        it can."""
        ...

    async def complete(self, call: UpstreamCall) -> Completion:
        """The whole answer from one non-streaming request."""
        ...

    def stream(self, call: UpstreamCall) -> AsyncGenerator[StreamEvent, None]:
        """Deltas and tool-call deltas, then exactly one Finished. An upstream failure raises
        ServiceError, also mid-stream; closing the iterator closes the HTTP stream."""
        ...

    async def probe(self) -> None:
        """Raise ServiceError saying why the server cannot answer now."""
        ...

    async def close(self) -> None: ...
