"""Retrieval-augmented grounding, the step a RAG chat completion takes before generation:

1. the query is the conversation's last user message;
2. it is embedded as a QUERY and searched (hybrid by default) in the caller's collection,
   always under the tenant of the API key, with the request's metadata filter;
3. the candidates are reranked and the best `top_n` kept, numbered [1]..[n];
4. a grounded system prompt (prompts.py) carries them, and it and the conversation are
   fitted to the token budget: the context service counts and compresses (without it, a
   conservative character estimate trims). The system prompt, the system messages and the
   current turn always stay; the passages come next, best first; older turns get the rest.

Errors: the services' gRPC errors propagate (an unknown collection is NOT_FOUND, a malformed
filter INVALID_ARGUMENT naming "filter..."); bad options raise `RagOptionError`.
"""

# No `from __future__ import annotations`: that import binds the name `annotations`, which
# the function below (named after OpenAI's response field) needs.
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from google.protobuf import struct_pb2

from daert.clients import ContextClient, EmbeddingClient, RerankClient, RetrievalClient
from daert.gateway.prompts import grounded_prompt, passage_block
from daert.v1 import common_pb2, context_pb2, embedding_pb2, rerank_pb2, retrieval_pb2

MODES = {
    "hybrid": retrieval_pb2.SEARCH_MODE_HYBRID,
    "vector": retrieval_pb2.SEARCH_MODE_VECTOR,
    "keyword": retrieval_pb2.SEARCH_MODE_KEYWORD,
}
MAX_TOP_K = 1000  # the retrieval service's default max_top_k
SNIPPET_CHARS = 300
# Without the context service tokens are estimated from characters: English runs near four
# characters a token, so three over-counts (what fits the estimate fits the model), plus
# what a chat template adds around each message.
CHARS_PER_TOKEN = 3
MESSAGE_OVERHEAD_TOKENS = 8
# The metadata keys the ingestion pipeline writes on every chunk.
SOURCE_URI_KEY = "source_uri"
TITLE_KEY = "title"
# [1] and [2][3] (two markers); [1, 2] is one marker citing two passages.
MARKER = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


class RagOptionError(ValueError):
    """A bad RAG option, or a conversation that cannot be grounded. `field` is the request
    parameter at fault ("rag.top_k", "messages", "token_budget"), for the 400's `param`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _struct(value: object) -> struct_pb2.Struct:
    if not isinstance(value, dict):
        raise RagOptionError("rag.filter", "must be a JSON object")
    struct = struct_pb2.Struct()
    try:
        struct.update(value)
    except (TypeError, ValueError) as exc:
        raise RagOptionError("rag.filter", f"is not JSON: {exc}") from None
    return struct


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class RagOptions:
    """The `rag` field of a chat completion; checked when made (RagOptionError)."""

    collection: str
    top_k: int = 20  # candidates from the search
    top_n: int = 5  # passages kept after rerank
    filter: dict[str, Any] | None = None  # the retrieval service's metadata filter
    mode: str = "hybrid"  # hybrid | vector | keyword

    def __post_init__(self) -> None:
        if not isinstance(self.collection, str) or not self.collection:
            raise RagOptionError("rag.collection", "must be a non-empty string")
        if not _is_int(self.top_k) or not 1 <= self.top_k <= MAX_TOP_K:
            raise RagOptionError("rag.top_k", f"must be an integer from 1 to {MAX_TOP_K}")
        if not _is_int(self.top_n) or not 1 <= self.top_n <= self.top_k:
            raise RagOptionError("rag.top_n", f"must be an integer from 1 to top_k ({self.top_k})")
        if self.mode not in MODES:
            raise RagOptionError("rag.mode", f"must be one of {', '.join(MODES)}")
        if self.filter is not None:
            _struct(self.filter)


@dataclass(frozen=True)
class Citation:
    index: int  # the [n] marker number in the prompt and answer, from 1
    chunk_id: str
    document_id: str
    source_uri: str
    score: float  # the reranker's relevance, in [0, 1]
    snippet: str  # the start of the chunk's text
    title: str = ""  # the document's title, when ingestion found one


@dataclass(frozen=True)
class Grounded:
    # The conversation to send to generation: grounded prompt + history, within the budget.
    messages: list[common_pb2.ChatMessage]
    citations: list[Citation]


@dataclass(frozen=True)
class _Passage:
    citation: Citation
    block: str  # the passage as the prompt shows it


def _metadata_text(metadata: struct_pb2.Struct, key: str) -> str:
    value = metadata.fields.get(key)
    return value.string_value if value is not None else ""


def snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    """The text on one line, cut at a word boundary near `limit` characters."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    return flat[:limit].rsplit(" ", 1)[0] + "…"


def _passage(index: int, chunk: retrieval_pb2.Chunk, score: float) -> _Passage:
    title = _metadata_text(chunk.metadata, TITLE_KEY)
    citation = Citation(
        index=index,
        chunk_id=chunk.id,
        document_id=chunk.document_id,
        source_uri=_metadata_text(chunk.metadata, SOURCE_URI_KEY),
        score=score,
        snippet=snippet(chunk.text),
        title=title,
    )
    return _Passage(citation, passage_block(index, chunk.text, title))


def _system(content: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=content)


def _said(message: common_pb2.ChatMessage) -> tuple[int, str]:
    return message.role, message.content


def estimate_tokens(message: common_pb2.ChatMessage) -> int:
    return math.ceil(len(message.content) / CHARS_PER_TOKEN) + MESSAGE_OVERHEAD_TOKENS


def current_turn(messages: Sequence[common_pb2.ChatMessage]) -> int:
    """Index of the last user message: the query. Earlier turns go to generation as
    history but do not steer the search (there is no query rewriting), so a follow-up
    that leans on them ("and in 2023?") is searched by its own words."""
    for i in reversed(range(len(messages))):
        if messages[i].role == common_pb2.ROLE_USER:
            if not messages[i].content.strip():
                raise RagOptionError("messages", "the last user message is empty")
            return i
    raise RagOptionError("messages", "retrieval needs a user message to search with")


def passages_that_fit(head: int, passages: Sequence[int], must: int, budget: int) -> int:
    """How many passages, best first, fit in `budget` beside the system prompt (`head`
    tokens) and the messages that always stay (`must` tokens)."""
    if head > budget:
        raise RagOptionError(
            "token_budget", f"the grounded prompt alone takes {head} tokens; the budget is {budget}"
        )
    if head + must > budget:
        raise RagOptionError(
            "messages",
            f"the system messages and the last turn take {must} tokens; with the grounded "
            f"prompt that is more than the budget of {budget}",
        )
    room, kept = budget - head - must, 0
    for cost in passages:
        if cost > room:
            break
        room, kept = room - cost, kept + 1
    return kept


def trim_by_estimate(
    messages: Sequence[common_pb2.ChatMessage],
    costs: Sequence[int],
    pinned: set[int],
    room: int,
) -> list[common_pb2.ChatMessage]:
    """The messages with the oldest unpinned turns dropped until the rest fits `room`:
    recent turns are kept newest first, and the first that does not fit ends the history
    (an older one after a gap would read out of context)."""
    keep = set(pinned)
    for i in sorted(set(range(len(messages))) - pinned, reverse=True):
        if costs[i] > room:
            break
        room -= costs[i]
        keep.add(i)
    return [m for i, m in enumerate(messages) if i in keep]


class RagPipeline:
    def __init__(
        self,
        *,
        embedding: EmbeddingClient,
        retrieval: RetrievalClient,
        rerank: RerankClient,
        context: ContextClient | None,
        embedding_model: str = "",
        tokenizer: str = "",
    ) -> None:
        self._embedding = embedding
        self._retrieval = retrieval
        self._rerank = rerank
        self._context = context
        self._embedding_model = embedding_model
        self._tokenizer = tokenizer

    async def ground(
        self,
        *,
        tenant: str,
        options: RagOptions,
        messages: list[common_pb2.ChatMessage],
        token_budget: int,
    ) -> Grounded:
        """`tenant` comes from the API key, never from the request body. `token_budget` is
        what the prompt may take (the model's context less the tokens left to answer)."""
        if token_budget <= 0:
            raise RagOptionError("token_budget", "must be positive")
        current = current_turn(messages)
        query = messages[current].content
        hits = await self._search(tenant, options, query)
        passages = await self._reranked(query, hits, options.top_n)

        priced = [_system(grounded_prompt([])), *(_system(p.block) for p in passages), *messages]
        costs, overhead = await self._costs(priced)
        head, turn_costs = costs[0], costs[-len(messages) :]
        passage_costs = costs[1 : len(passages) + 1]
        pinned = {
            i for i, m in enumerate(messages) if i >= current or m.role == common_pb2.ROLE_SYSTEM
        }
        must = sum(turn_costs[i] for i in pinned)
        kept = passages_that_fit(head + overhead, passage_costs, must, token_budget)
        if self._context is None:
            room = token_budget - head - must - sum(passage_costs[:kept])
            fitted = [
                _system(grounded_prompt([p.block for p in passages[:kept]])),
                *trim_by_estimate(messages, turn_costs, pinned, room),
            ]
        else:
            fitted, kept = await self._compress(
                self._context, tenant, passages, kept, messages, current, token_budget
            )
        return Grounded(fitted, [p.citation for p in passages[:kept]])

    async def _search(
        self, tenant: str, options: RagOptions, query: str
    ) -> list[retrieval_pb2.SearchHit]:
        request = retrieval_pb2.SearchRequest(
            collection=options.collection,
            tenant=tenant,
            query_text=query,
            top_k=options.top_k,
            mode=MODES[options.mode],
        )
        if options.filter:
            request.filter.CopyFrom(_struct(options.filter))
        if options.mode != "keyword":
            # The query vector needs the collection's length: ingestion may have kept only
            # the first dimensions of the model's vectors (Matryoshka).
            described = await self._retrieval.stub.GetCollection(
                retrieval_pb2.GetCollectionRequest(collection=options.collection, tenant=tenant)
            )
            [vector] = await self._embedding.embed_texts(
                [query],
                model=self._embedding_model,
                input_type=embedding_pb2.INPUT_TYPE_QUERY,
                dimensions=described.collection.dimensions,
            )
            request.query_vector.CopyFrom(common_pb2.Vector(values=vector))
        reply = await self._retrieval.stub.Search(request)
        return list(reply.hits)

    async def _reranked(
        self, query: str, hits: list[retrieval_pb2.SearchHit], top_n: int
    ) -> list[_Passage]:
        if not hits:
            return []
        reply = await self._rerank.stub.Rerank(
            rerank_pb2.RerankRequest(
                query=query, documents=[h.chunk.text for h in hits], top_n=top_n
            )
        )
        return [
            _passage(rank, hits[result.index].chunk, result.score)
            for rank, result in enumerate(reply.results, start=1)
        ]

    async def _costs(self, messages: list[common_pb2.ChatMessage]) -> tuple[list[int], int]:
        """Tokens of each message, and what the chat template adds for the whole."""
        if self._context is None:
            return [estimate_tokens(m) for m in messages], 0
        reply = await self._context.stub.CountTokens(
            context_pb2.CountTokensRequest(messages=messages, tokenizer=self._tokenizer)
        )
        per_message = list(reply.message_tokens)
        return per_message, reply.tokens - sum(per_message)

    async def _compress(
        self,
        context: ContextClient,
        tenant: str,
        passages: list[_Passage],
        kept: int,
        messages: list[common_pb2.ChatMessage],
        current: int,
        token_budget: int,
    ) -> tuple[list[common_pb2.ChatMessage], int]:
        """The grounded conversation compressed to the budget (older turns summarised or
        dropped), and how many passages it holds. The passages were counted one message
        each, which over-counts; if the exact fit still cut or condensed the current turn,
        the lowest passage gives way and it is fitted again."""
        # Compared by what was said: fields the context service does not carry back must
        # not read as a cut.
        current_turns = [_said(m) for m in messages[current:]]
        while True:
            prompt = _system(grounded_prompt([p.block for p in passages[:kept]]))
            reply = await context.stub.Compress(
                context_pb2.CompressRequest(
                    messages=[prompt, *messages],
                    token_budget=token_budget,
                    tokenizer=self._tokenizer,
                    tenant=tenant,
                )
            )
            fitted = list(reply.messages)
            if kept == 0 or [_said(m) for m in fitted[-len(current_turns) :]] == current_turns:
                return fitted, kept
            kept -= 1


def annotations(text: str, citations: Sequence[Citation]) -> list[dict[str, Any]]:
    """OpenAI's `message.annotations` for the [n] markers in an answer: one url_citation per
    cited passage, spanning its marker (text[start_index:end_index]). Markers that name no
    passage are ignored."""
    by_index = {c.index: c for c in citations}
    found: list[dict[str, Any]] = []
    for marker in MARKER.finditer(text):
        for number in marker.group(1).split(","):
            citation = by_index.get(int(number))
            if citation is None:
                continue
            found.append(
                {
                    "type": "url_citation",
                    "url_citation": {
                        "start_index": marker.start(),
                        "end_index": marker.end(),
                        "url": citation.source_uri,
                        "title": citation.title or citation.document_id or citation.chunk_id,
                    },
                }
            )
    return found


def citations_payload(citations: Sequence[Citation]) -> list[dict[str, Any]]:
    """The response's `citations` list, one entry per passage given to the model."""
    return [asdict(c) for c in citations]
