"""Server-sent events from a GenerateStream call: the first message is read before the HTTP
response starts, so an error the services report up front (bad input, no backend) is a proper
HTTP status; later ones become an error event. Whatever ends the stream — its last message, a
client that hangs up — cancels the gRPC call, and through it the LLM server's stream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from fastapi.responses import StreamingResponse

from daert.v1 import generation_pb2, generation_pb2_grpc

DONE = "data: [DONE]\n\n"


def event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class GenerationStream:
    def __init__(self, call: Any, first: generation_pb2.GenerateStreamResponse) -> None:
        self._call = call
        self._first = first
        self.completion_tokens = 0  # deltas seen, until the last message says how many
        self.total_tokens = 0

    @classmethod
    async def open(
        cls,
        stub: generation_pb2_grpc.GenerationServiceAsyncStub,
        request: generation_pb2.GenerateStreamRequest,
    ) -> GenerationStream:
        call = stub.GenerateStream(request)
        try:
            first = await call.read()
        except BaseException:
            call.cancel()
            raise
        if first is grpc.aio.EOF:
            call.cancel()
            raise RuntimeError("the generation service ended the stream without an answer")
        return cls(call, first)

    async def messages(self) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        message = self._first
        try:
            while message is not grpc.aio.EOF:
                if message.delta:
                    self.completion_tokens += 1
                if message.finish_reason:
                    self.completion_tokens = message.usage.completion_tokens
                    self.total_tokens = message.usage.total_tokens or (
                        message.usage.prompt_tokens + message.usage.completion_tokens
                    )
                yield message
                message = await self._call.read()
        finally:
            self._call.cancel()

    def tokens_used(self) -> int:
        """What the stream cost, for the key's token limit: the usage of its last message,
        else (the client left early) the deltas sent so far."""
        return self.total_tokens or self.completion_tokens


def sse_response(events: AsyncIterator[str], on_close: Callable[[], None]) -> StreamingResponse:
    async def guarded() -> AsyncIterator[str]:
        try:
            async for item in events:
                yield item
        finally:
            on_close()

    return StreamingResponse(
        guarded(),
        media_type="text/event-stream",
        # Proxies must pass each event on as it comes.
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )
