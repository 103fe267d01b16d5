"""ContextService: validation and wiring. Counting lives in `tokenizers/`, summaries in
`summarizers/`, the fitting itself in `compressor`, rolling summaries in `rolling`."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from daert.context.compressor import AUTO, CompressJob, Compressor
from daert.context.config import ContextSettings
from daert.context.messages import parse_messages
from daert.context.rolling import RollingSummaries
from daert.context.summarizers import AbstractiveSummarizer, ExtractiveSummarizer, Summarizer
from daert.context.tokenizers import TemplatedTokenizer, create_tokenizer
from daert.runtime.model_set import ModelSet
from daert.runtime.redis_state import RedisState
from daert.runtime.validation import require
from daert.v1 import common_pb2, context_pb2, context_pb2_grpc


class ContextServicer(context_pb2_grpc.ContextServiceServicer):
    def __init__(self, settings: ContextSettings) -> None:
        self._settings = settings
        self._tokenizers: ModelSet[TemplatedTokenizer] = ModelSet(
            {t.name: create_tokenizer(t) for t in settings.tokenizers}, kind="tokenizer"
        )
        redis = (
            RedisState(
                "context", settings.redis_url, settings.redis_password, settings.redis_timeout_s
            )
            if settings.redis_url
            else None
        )
        self._rolling = RollingSummaries(redis, settings.summary_ttl_s)
        abstractive = AbstractiveSummarizer(
            settings.summary_timeout_s, settings.summary_chunk_tokens // 4
        )
        extractive = ExtractiveSummarizer(settings.extractive_model, settings.summary_timeout_s)
        self._summarizers: dict[int, Summarizer] = {
            abstractive.strategy: abstractive,
            extractive.strategy: extractive,
        }
        self._compressor = Compressor(
            self._summarizers, self._rolling, settings.summary_chunk_tokens
        )

    # --- the runtime's Service protocol -------------------------------------------------

    def add_to_server(self, server: grpc.aio.Server) -> Sequence[str]:
        context_pb2_grpc.add_ContextServiceServicer_to_server(self, server)
        return [context_pb2.DESCRIPTOR.services_by_name["ContextService"].full_name]

    async def start(self) -> None:
        await self._tokenizers.start()

    async def ready(self) -> bool:
        """Ready when the default tokenizer answers: summaries degrade (AUTO falls back),
        counting cannot."""
        return await self._tokenizers.ready()

    async def close(self) -> None:
        await self._tokenizers.close()
        for summarizer in self._summarizers.values():
            await summarizer.close()
        await self._rolling.close()

    # --- RPCs ------------------------------------------------------------------------------

    async def Compress(
        self, request: context_pb2.CompressRequest, context: grpc.aio.ServicerContext
    ) -> context_pb2.CompressResponse:
        messages = parse_messages(
            request.messages, self._settings.max_messages, self._settings.max_request_chars
        )
        require(request.token_budget > 0, "token_budget", "must be positive")
        keep_last = (
            request.keep_last_messages
            if request.HasField("keep_last_messages")
            else self._settings.keep_last_messages
        )
        require(keep_last >= 0, "keep_last_messages", "must be 0 or positive")
        require(
            request.strategy in context_pb2.CompressionStrategy.values(),
            "strategy",
            f"unknown strategy {request.strategy}",
        )
        require(request.summary_max_tokens >= 0, "summary_max_tokens", "must be 0 or positive")
        require(
            request.summary_max_tokens < request.token_budget,
            "summary_max_tokens",
            "must be smaller than token_budget",
        )
        job = CompressJob(
            messages=messages,
            budget=request.token_budget,
            keep_last=keep_last,
            strategy=request.strategy or AUTO,
            tokenizer=self._tokenizers.get(request.tokenizer),
            tenant=request.tenant,
            conversation_id=request.conversation_id,
            summary_model=request.summary_model or self._settings.summary_model,
            summary_max_tokens=request.summary_max_tokens,
        )
        result = await self._compressor.compress(job)
        usage = common_pb2.Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.prompt_tokens + result.completion_tokens,
        )
        return context_pb2.CompressResponse(
            messages=[m.to_proto() for m in result.messages],
            summary=result.summary,
            tokens_before=result.tokens_before,
            tokens_after=result.tokens_after,
            strategy_used=result.strategy_used,
            messages_compressed=result.messages_compressed,
            summary_reused=result.summary_reused,
            usage=usage,
            truncated_messages=result.truncated,
            fallback_reason=result.fallback_reason,
        )

    async def CountTokens(
        self, request: context_pb2.CountTokensRequest, context: grpc.aio.ServicerContext
    ) -> context_pb2.CountTokensResponse:
        messages = parse_messages(
            request.messages, self._settings.max_messages, self._settings.max_request_chars
        )
        tokenizer = self._tokenizers.get(request.tokenizer)
        counted = await tokenizer.count(messages)
        return context_pb2.CountTokensResponse(
            tokens=counted.total, message_tokens=counted.per_message, tokenizer=tokenizer.name
        )

    async def DeleteConversation(
        self, request: context_pb2.DeleteConversationRequest, context: grpc.aio.ServicerContext
    ) -> context_pb2.DeleteConversationResponse:
        require(bool(request.conversation_id), "conversation_id", "must not be empty")
        deleted = await self._rolling.delete(request.tenant, request.conversation_id)
        return context_pb2.DeleteConversationResponse(deleted=deleted)
