"""The request bodies of the OpenAI API (and of the Cohere/Jina rerank API), as the gateway
accepts them. Fields OpenAI defines that the stack cannot honour are declared too, so that a
client setting one gets a 400 naming it instead of a silently different answer; fields no
one defines are ignored, as OpenAI-compatible servers do."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionDefinition(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionCall(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    # "developer" is OpenAI's newer name for "system".
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class JsonSchemaFormat(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class RagRequest(_Body):
    """The gateway's own extension: answer from a collection, with citations."""

    collection: str = Field(min_length=1)
    top_k: int = Field(20, ge=1, le=200, description="Candidates from hybrid search.")
    top_n: int = Field(5, ge=1, le=50, description="Passages kept after reranking.")
    filter: dict[str, Any] | None = None
    mode: Literal["hybrid", "vector", "keyword"] = "hybrid"


class _Sampling(_Body):
    """What chat and text completions share."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    # Sampling parameters of the generation contract that OpenAI lacks (vLLM accepts the
    # same names as extra body fields).
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    # Its range and its need for logprobs are the generation service's to check.
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    rag: RagRequest | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    # OpenAI's default for /v1/completions.
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    # The number of alternatives per token (0: the chosen token's only); unset: none.
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = None


class EmbeddingRequest(_Body):
    input: str | list[str] | list[int] | list[list[int]]
    model: str = Field(min_length=1)
    dimensions: int | None = Field(None, ge=1)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


class RerankDocument(_Body):
    text: str


class RerankRequest(_Body):
    query: str
    documents: list[str | RerankDocument] = Field(min_length=1)
    model: str = ""
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = True
