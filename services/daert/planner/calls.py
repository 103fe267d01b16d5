"""The generation calls the planner and its tasks make, and how a prompt is fitted to the
model: through the context service when the run has one (DAERT_CONTEXT_TARGET set, as `daert
up` does when it runs it), else by trimming the dependency results by a character estimate.
Every call has a deadline."""

from __future__ import annotations

import math
import os
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from daert.clients import ContextClient, GenerationClient, ServiceClient
from daert.planner.errors import service_error
from daert.v1 import common_pb2, context_pb2, generation_pb2

T = TypeVar("T")

GENERATE_TIMEOUT_S = 120.0
CONTEXT_TIMEOUT_S = 30.0
LIST_TIMEOUT_S = 10.0
# When ListModels does not say (context_length 0).
DEFAULT_CONTEXT_TOKENS = 4096
# Without the context service: English runs near four characters a token, so three
# over-counts (what fits the estimate fits the model), plus a chat template's per message.
CHARS_PER_TOKEN = 3
MESSAGE_OVERHEAD_TOKENS = 8
CUT = " …[cut to fit the model's context]"


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def add(self, usage: common_pb2.Usage | Usage | dict[str, int]) -> None:
        if isinstance(usage, dict):
            usage = Usage(**usage)
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.total_tokens += usage.total_tokens

    def to_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass
class Generated:
    text: str
    model: str
    usage: Usage = field(default_factory=Usage)


def system(content: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=content)


def user(content: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=content)


def assistant(content: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, content=content)


async def call(client: ServiceClient, doing: str, rpc: Awaitable[T]) -> T:
    """`rpc`, with a failed call turned into ServiceUnavailable / PlannerError."""
    try:
        return await rpc
    except grpc.aio.AioRpcError as exc:
        raise service_error(exc, client.service, client.target, doing) from exc


async def generate(
    client: GenerationClient,
    doing: str,
    messages: Sequence[common_pb2.ChatMessage],
    *,
    model: str,
    tenant: str,
    max_tokens: int,
    response_format: generation_pb2.ResponseFormat | None = None,
) -> Generated:
    request = generation_pb2.GenerateRequest(
        model=model,
        tenant=tenant,
        messages=list(messages),
        params=generation_pb2.SamplingParams(temperature=0, max_tokens=max_tokens),
        response_format=response_format,
    )
    reply = await call(client, doing, client.stub.Generate(request, timeout=GENERATE_TIMEOUT_S))
    generated = Generated(reply.text, reply.model)
    generated.usage.add(reply.usage)
    return generated


async def context_tokens(client: GenerationClient, model: str) -> int:
    """The model's context length, as the generation service lists it."""
    reply = await call(
        client,
        "listing the generation models",
        client.stub.ListModels(
            generation_pb2.GenerationServiceListModelsRequest(), timeout=LIST_TIMEOUT_S
        ),
    )
    for entry in reply.models:
        if entry.name == model if model else entry.is_default:
            return entry.context_length or DEFAULT_CONTEXT_TOKENS
    return DEFAULT_CONTEXT_TOKENS


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN) + MESSAGE_OVERHEAD_TOKENS


def trim_by_estimate(
    messages: Sequence[common_pb2.ChatMessage], budget: int
) -> list[common_pb2.ChatMessage]:
    """The first (the task's system prompt) and last (its instruction) messages kept whole;
    those between (dependency results) cut to an equal share of what is left of `budget`."""
    head, middle, last = messages[0], list(messages[1:-1]), messages[-1]
    room = budget - estimate_tokens(head.content) - estimate_tokens(last.content)
    if not middle or sum(estimate_tokens(m.content) for m in middle) <= room:
        return list(messages)
    share = max(0, room // len(middle) - MESSAGE_OVERHEAD_TOKENS) * CHARS_PER_TOKEN
    cut = []
    for message in middle:
        text = message.content
        if len(text) > share:
            text = text[: max(0, share - len(CUT))] + CUT
        cut.append(common_pb2.ChatMessage(role=message.role, content=text))
    return [head, *cut, last]


async def fit(
    messages: Sequence[common_pb2.ChatMessage],
    budget: int,
    tenant: str,
    usage: Usage,
    tokenizer: str = "",
) -> tuple[list[common_pb2.ChatMessage], str]:
    """`messages` within `budget` tokens, and how ("context service" or "estimate"). The
    context service counts with `tokenizer` (empty: its default), keeps the system prompt and
    the last message (the instruction) and condenses the rest (AUTO: abstractive, else
    extractive, else dropped)."""
    if not os.environ.get("DAERT_CONTEXT_TARGET"):
        return trim_by_estimate(messages, budget), "estimate"
    async with ContextClient() as context:
        reply = await call(
            context,
            "fitting the prompt to the model",
            context.stub.Compress(
                context_pb2.CompressRequest(
                    messages=list(messages),
                    token_budget=budget,
                    keep_last_messages=1,
                    strategy=context_pb2.COMPRESSION_STRATEGY_AUTO,
                    tokenizer=tokenizer,
                    tenant=tenant,
                ),
                timeout=CONTEXT_TIMEOUT_S,
            ),
        )
    usage.add(reply.usage)
    return list(reply.messages), "context service"
