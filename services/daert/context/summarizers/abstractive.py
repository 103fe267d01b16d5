"""ABSTRACTIVE: the generation service writes the summary, greedy, bounded by max_tokens and
by `longest`: the summary so far is part of the next prompt, so instructions, summary,
chunk of turns and the new summary must all fit the summary model's context."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from daert.clients import GenerationClient
from daert.context.messages import Message
from daert.context.summarizers.base import Condensing, Summary, transcript
from daert.runtime.errors import NotFound, downstream_error
from daert.v1 import common_pb2, context_pb2, generation_pb2

INSTRUCTIONS = (
    "You condense conversations so that an assistant can continue them. Write a short, "
    "factual summary of the conversation below in plain sentences. Keep every name, "
    "number, date, quantity, identifier, file name and decision exactly as written. Do not "
    "add anything that was not said. Answer with the summary only."
)


def summary_prompt(previous: str, turns: Sequence[Message], max_tokens: int) -> str:
    parts = []
    if previous:
        parts += ["Summary of the conversation so far:", previous, ""]
    parts += ["New turns of the conversation:" if previous else "The conversation:"]
    parts += transcript(turns)
    parts += [
        "",
        f"Write the {'updated ' if previous else ''}summary in under {max_tokens} tokens.",
    ]
    return "\n".join(parts)


class AbstractiveSummarizer:
    strategy = context_pb2.COMPRESSION_STRATEGY_ABSTRACTIVE

    def __init__(self, timeout_s: float, longest: int) -> None:
        self._timeout_s = timeout_s
        self._longest = longest
        self._client: GenerationClient | None = None  # made on first use, inside the loop

    async def fold(
        self, previous: str, turns: Sequence[Message], max_tokens: int, job: Condensing
    ) -> Summary:
        max_tokens = min(max_tokens, self._longest)
        if self._client is None:
            # DAERT_GENERATION_TARGET names the service. One attempt: a dead generation
            # service must fail fast (AUTO then falls back to EXTRACTIVE).
            self._client = GenerationClient(timeout_s=self._timeout_s, max_attempts=1)
        request = generation_pb2.GenerateRequest(
            model=job.summary_model,
            tenant=job.tenant,
            messages=[
                common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=INSTRUCTIONS),
                common_pb2.ChatMessage(
                    role=common_pb2.ROLE_USER, content=summary_prompt(previous, turns, max_tokens)
                ),
            ],
            params=generation_pb2.SamplingParams(max_tokens=max_tokens, temperature=0),
        )
        try:
            reply = await self._client.stub.Generate(request)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"summary_model: {exc.details()}") from None
            raise downstream_error(
                exc, "abstractive summaries", self._client.service, self._client.target
            ) from None
        return Summary(reply.text.strip(), reply.usage.prompt_tokens, reply.usage.completion_tokens)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
