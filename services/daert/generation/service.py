"""GenerationService: validation and wiring. Wire formats live in `backends/`, retries in
`relay`, the cache in `cache`, coalescing in `flights`, adapter routing in `routing`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import duration_pb2

from daert.generation.backends import Completion, GenerationBackend, create_backend
from daert.generation.cache import CachedAnswer, CacheKey, ResponseCache, SemanticIndex, cache_key
from daert.generation.config import GenerationSettings, ModelConfig
from daert.generation.flights import Flights
from daert.generation.relay import (
    RetryPolicy,
    complete_with_retries,
    merge_backlog,
    stream_with_retries,
)
from daert.generation.request import (
    Delta,
    Finished,
    GenerationInput,
    Request,
    StreamEvent,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    assemble_tool_calls,
    parse_input,
    whole_calls,
)
from daert.generation.routing import Target, Targets
from daert.runtime.errors import FailedPrecondition, ServiceError
from daert.runtime.model_set import ModelSet
from daert.runtime.redis_state import RedisState
from daert.v1 import common_pb2, generation_pb2, generation_pb2_grpc

log = logging.getLogger("daert.generation")


class ServedModel:
    """A configured model, its server, and whether that server answered the last probe."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.backend = create_backend(config)
        self.ready = False
        self.unavailable_reason = "not probed yet"

    async def start(self) -> None:
        """Nothing to load: the server may come up after us; readiness keeps asking."""

    async def check_ready(self) -> bool:
        try:
            await self.backend.probe()
        except ServiceError as exc:
            if exc.message != self.unavailable_reason:
                log.warning(
                    "generation model not ready",
                    extra={"model": self.config.name, "reason": exc.message},
                )
            self.ready, self.unavailable_reason = False, exc.message
        else:
            if not self.ready:
                log.info("generation model ready", extra={"model": self.config.name})
            self.ready, self.unavailable_reason = True, ""
        return self.ready

    async def close(self) -> None:
        await self.backend.close()


@dataclass(frozen=True)
class Started:
    """The first event of a generation: where it runs."""

    model: str
    adapter_id: str
    backend: generation_pb2.GenerationBackend.ValueType
    replica: str


Event = Started | Delta | ToolCallDelta | Finished


@dataclass(frozen=True)
class Plan:
    """A validated request and how it may use the cache."""

    model: ServedModel
    input: GenerationInput
    adapter: str
    tenant: str
    key: CacheKey | None  # None: neither cached nor coalesced
    read_cache: bool


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, settings: GenerationSettings) -> None:
        self._settings = settings
        self._models = ModelSet({m.name: ServedModel(m) for m in settings.models})
        self._retry = RetryPolicy(settings.retry_attempts, settings.retry_backoff_s)
        self._targets = Targets()
        self._flights: Flights[Event] = Flights()
        self._cache = self._response_cache(settings)

    @staticmethod
    def _response_cache(settings: GenerationSettings) -> ResponseCache | None:
        if not settings.redis_url:
            return None
        redis = RedisState(
            "generation", settings.redis_url, settings.redis_password, settings.redis_timeout_s
        )
        semantic = (
            SemanticIndex(
                redis,
                settings.semantic_cache_threshold,
                settings.semantic_cache_model,
                settings.semantic_cache_max_entries,
                settings.cache_ttl_s,
            )
            if settings.semantic_cache
            else None
        )
        return ResponseCache(redis, settings.cache_ttl_s, semantic)

    # --- the runtime's Service protocol -------------------------------------------------

    def add_to_server(self, server: grpc.aio.Server) -> Sequence[str]:
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(self, server)
        return [generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name]

    async def start(self) -> None:
        await self._models.start()

    async def ready(self) -> bool:
        return await self._models.ready()

    async def close(self) -> None:
        await self._models.close()
        await self._targets.close()
        if self._cache is not None:
            await self._cache.close()

    # --- RPCs ------------------------------------------------------------------------------

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.GenerateResponse:
        received = time.perf_counter()
        plan = self._plan(request)
        events, cached = await self._events(plan, streaming=False)
        text: list[str] = []
        logprobs: list[TokenLogprob] = []
        calls: list[ToolCallDelta] = []
        started: Started | None = None
        finished: Finished | None = None
        first_token: float | None = None
        async with aclosing(events):
            async for event in events:
                if isinstance(event, Started):
                    started = event
                elif isinstance(event, Delta | ToolCallDelta):
                    first_token = first_token or time.perf_counter()
                    if isinstance(event, Delta):
                        text.append(event.text)
                        logprobs += event.logprobs
                    else:
                        calls.append(event)
                else:
                    finished = event
        assert started is not None and finished is not None
        return generation_pb2.GenerateResponse(
            text="".join(text),
            logprobs=_logprobs(logprobs),
            tool_calls=[_tool_call(c) for c in assemble_tool_calls(calls)],
            finish_reason=finished.reason,
            usage=_usage(finished),
            cached=cached,
            model=started.model,
            adapter_id=started.adapter_id,
            backend=started.backend,
            replica=started.replica,
            # A server's unary answer comes all at once: its first token is not observable.
            timings=_timings(received, first_token if cached else None),
        )

    async def GenerateStream(
        self, request: generation_pb2.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        received = time.perf_counter()
        plan = self._plan(request)
        events, cached = await self._events(plan, streaming=True)
        events = merge_backlog(events)
        started: Started | None = None
        first_token: float | None = None
        async with aclosing(events):
            async for event in events:
                if isinstance(event, Started):
                    started = event
                    continue
                assert started is not None
                if isinstance(event, Delta | ToolCallDelta):
                    message = (
                        generation_pb2.GenerateStreamResponse(
                            delta=event.text, logprobs=_logprobs(event.logprobs)
                        )
                        if isinstance(event, Delta)
                        else generation_pb2.GenerateStreamResponse(
                            tool_calls=[_tool_call_delta(event)]
                        )
                    )
                    if first_token is None:  # the first and the last message say where
                        first_token = time.perf_counter()
                        _stamp(message, started)
                    yield message
                else:
                    message = generation_pb2.GenerateStreamResponse(
                        finish_reason=event.reason,
                        usage=_usage(event),
                        cached=cached,
                        timings=_timings(received, first_token),
                        error=event.error,
                    )
                    _stamp(message, started)
                    yield message

    async def ListModels(
        self,
        request: generation_pb2.GenerationServiceListModelsRequest,
        context: grpc.aio.ServicerContext,
    ) -> generation_pb2.GenerationServiceListModelsResponse:
        models = [
            generation_pb2.GenerationModel(
                name=name,
                backend=model.backend.kind,
                description=model.config.description,
                supports_structured_output=model.config.supports_structured_output,
                ready=model.ready,
                is_default=name == self._models.default,
                context_length=model.config.context_length,
                supports_adapters=model.config.adapters != "none",
                unavailable_reason=model.unavailable_reason,
                supports_tools=model.config.supports_tools,
                supports_logprobs=_supports_logprobs(model),
                base_model=model.config.router_base_model
                if model.config.adapters != "none"
                else "",
            )
            for name, model in self._models.items()
        ]
        return generation_pb2.GenerationServiceListModelsResponse(models=models)

    # --- helpers ---------------------------------------------------------------------------

    def _plan(self, request: Request) -> Plan:
        model = self._models.get(request.model)
        generation_input = parse_input(request, self._settings.max_request_chars)
        if generation_input.output.kind != "text" and not model.config.supports_structured_output:
            raise FailedPrecondition(
                f"model {model.config.name!r} does not support structured output"
            )
        if generation_input.uses_tools and not model.config.supports_tools:
            raise FailedPrecondition(
                f"model {model.config.name!r} does not support tools (function calling)"
            )
        if generation_input.logprobs and not _supports_logprobs(model):
            who = (
                model.backend.label
                if not model.backend.returns_logprobs
                else f"model {model.config.name!r}"
            )
            raise FailedPrecondition(f"{who} does not return log probabilities", "logprobs")
        reason = model.backend.unsupported(generation_input)
        if reason:
            raise FailedPrecondition(reason)
        policy = request.cache_policy
        cacheable = policy != generation_pb2.CACHE_POLICY_BYPASS and (
            generation_input.sampling.deterministic or request.allow_cache_nondeterministic
        )
        key = (
            cache_key(
                model.config.backend,
                model.config.name,
                request.adapter_id,
                request.tenant,
                generation_input,
            )
            if cacheable
            else None
        )
        return Plan(
            model=model,
            input=generation_input,
            adapter=request.adapter_id,
            tenant=request.tenant,
            key=key,
            read_cache=policy != generation_pb2.CACHE_POLICY_REFRESH,
        )

    async def _events(
        self, plan: Plan, *, streaming: bool
    ) -> tuple[AsyncGenerator[Event, None], bool]:
        """The generation's events, and whether they come from the cache."""
        if plan.key is None:
            return self._generate(plan, streaming), False
        if plan.read_cache and self._cache is not None:
            answer = await self._cache.lookup(plan.key)
            if answer is not None:
                return _replay(answer), True
        mode = "stream" if streaming else "unary"
        flight = f"{mode}:{plan.key.exact}"
        return self._flights.follow(flight, lambda: self._generate(plan, streaming)), False

    async def _generate(self, plan: Plan, streaming: bool) -> AsyncGenerator[Event, None]:
        config = plan.model.config
        target = await self._targets.resolve(
            config, plan.model.backend, plan.input, plan.adapter, plan.tenant
        )
        try:
            yield Started(config.name, target.adapter_id, target.backend.kind, target.replica)
            deltas: list[Delta] = []
            calls: list[ToolCallDelta] = []
            finished: Finished | None = None
            async with aclosing(self._upstream(target, streaming)) as events:
                async for event in events:
                    if isinstance(event, Delta):
                        deltas.append(event)
                    elif isinstance(event, ToolCallDelta):
                        calls.append(event)
                    else:
                        finished = event
                    yield event
            if plan.key is not None and self._cache is not None and finished is not None:
                answer = CachedAnswer(
                    deltas=[d.text for d in deltas],
                    finish_reason=finished.reason,
                    prompt_tokens=finished.prompt_tokens,
                    completion_tokens=finished.completion_tokens,
                    model=config.name,
                    adapter_id=target.adapter_id,
                    backend=target.backend.kind,
                    replica=target.replica,
                    tool_calls=[[c.id, c.name, c.arguments] for c in assemble_tool_calls(calls)],
                    logprobs=(
                        [[_stored(lp) for lp in d.logprobs] for d in deltas]
                        if plan.input.logprobs
                        else []
                    ),
                )
                # Stored even if every caller left meanwhile: the work is done.
                await asyncio.shield(self._cache.store(plan.key, answer))
        finally:
            self._targets.release(target)

    def _upstream(self, target: Target, streaming: bool) -> AsyncGenerator[StreamEvent, None]:
        backend: GenerationBackend = target.backend
        if streaming:
            return stream_with_retries(
                self._retry, backend.label, lambda: backend.stream(target.call)
            )
        return _unary(self._retry, backend, target)


async def _unary(
    retry: RetryPolicy, backend: GenerationBackend, target: Target
) -> AsyncGenerator[StreamEvent, None]:
    completion: Completion = await complete_with_retries(
        retry, backend.label, lambda: backend.complete(target.call)
    )
    if completion.text or completion.logprobs:
        yield Delta(completion.text, completion.logprobs)
    for call in whole_calls(completion.tool_calls):
        yield call
    yield completion.finished


async def _replay(answer: CachedAnswer) -> AsyncGenerator[Event, None]:
    backend = generation_pb2.GenerationBackend.ValueType(answer.backend)
    yield Started(answer.model, answer.adapter_id, backend, answer.replica)
    # Entries stored without log probabilities have none; requests for them have their own.
    logprobs = answer.logprobs or [[] for _ in answer.deltas]
    for delta, stored in zip(answer.deltas, logprobs, strict=True):
        yield Delta(delta, tuple(_replayed(lp) for lp in stored))
    for call in whole_calls([ToolCall(*fields) for fields in answer.tool_calls]):
        yield call
    yield Finished(
        generation_pb2.FinishReason.ValueType(answer.finish_reason),
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
    )


def _supports_logprobs(model: ServedModel) -> bool:
    return model.backend.returns_logprobs and model.config.supports_logprobs


def _logprobs(logprobs: Sequence[TokenLogprob]) -> list[generation_pb2.TokenLogprob]:
    return [
        generation_pb2.TokenLogprob(
            token=lp.token,
            logprob=lp.logprob,
            top_logprobs=[
                generation_pb2.TopLogprob(token=token, logprob=value) for token, value in lp.top
            ],
        )
        for lp in logprobs
    ]


def _stored(logprob: TokenLogprob) -> list[Any]:
    return [logprob.token, logprob.logprob, [list(top) for top in logprob.top]]


def _replayed(stored: list[Any]) -> TokenLogprob:
    token, logprob, top = stored
    return TokenLogprob(token, logprob, tuple((t, v) for t, v in top))


def _tool_call(call: ToolCall) -> common_pb2.ToolCall:
    return common_pb2.ToolCall(id=call.id, name=call.name, arguments=call.arguments)


def _tool_call_delta(delta: ToolCallDelta) -> generation_pb2.ToolCallDelta:
    return generation_pb2.ToolCallDelta(
        index=delta.index, id=delta.id, name=delta.name, arguments_delta=delta.arguments
    )


def _stamp(message: generation_pb2.GenerateStreamResponse, started: Started) -> None:
    message.model = started.model
    message.adapter_id = started.adapter_id
    message.backend = started.backend
    message.replica = started.replica


def _usage(finished: Finished) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=finished.prompt_tokens,
        completion_tokens=finished.completion_tokens,
        total_tokens=finished.prompt_tokens + finished.completion_tokens,
    )


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def _timings(received: float, first_token: float | None) -> generation_pb2.GenerationTimings:
    timings = generation_pb2.GenerationTimings(total=_duration(time.perf_counter() - received))
    if first_token is not None:
        timings.time_to_first_token.CopyFrom(_duration(first_token - received))
    return timings
