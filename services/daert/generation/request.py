"""A generation request, validated once into plain values every backend reads, and the
events a generation produces."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from google.protobuf import json_format

from daert.runtime.validation import require
from daert.v1 import common_pb2, generation_pb2

ROLES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
    common_pb2.ROLE_TOOL: "tool",
}
MAX_STOP_SEQUENCES = 16
# TGI and vLLM take seeds as unsigned 64-bit integers.
MAX_SEED = 2**63 - 1

OutputKind = Literal["text", "json_object", "json_schema", "regex"]
_OUTPUT_KINDS: dict[int, OutputKind] = {
    generation_pb2.RESPONSE_FORMAT_TYPE_UNSPECIFIED: "text",
    generation_pb2.RESPONSE_FORMAT_TYPE_TEXT: "text",
    generation_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT: "json_object",
    generation_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA: "json_schema",
    generation_pb2.RESPONSE_FORMAT_TYPE_REGEX: "regex",
}

Request = generation_pb2.GenerateRequest | generation_pb2.GenerateStreamRequest


@dataclass(frozen=True)
class Message:
    role: str  # system, user, assistant, tool
    content: str
    name: str = ""


@dataclass(frozen=True)
class Sampling:
    """Decoding parameters; None (or empty) leaves the backend's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def deterministic(self) -> bool:
        """Greedy decoding or a fixed seed: the same request gives the same answer."""
        return self.temperature == 0 or self.seed is not None


@dataclass(frozen=True)
class OutputFormat:
    kind: OutputKind = "text"
    schema: dict[str, Any] | None = None  # json_schema
    regex: str = ""
    name: str = "response"


@dataclass(frozen=True)
class GenerationInput:
    """What to generate: exactly one of `messages` and `prompt` is set."""

    messages: tuple[Message, ...] | None
    prompt: str | None
    sampling: Sampling = field(default_factory=Sampling)
    output: OutputFormat = field(default_factory=OutputFormat)

    def canonical(self) -> dict[str, Any]:
        """Every field that changes the answer, as JSON-ready values (the cache key)."""
        return {
            "messages": [[m.role, m.content, m.name] for m in self.messages or ()],
            "prompt": self.prompt,
            "sampling": self.sampling.__dict__ | {"stop": list(self.sampling.stop)},
            "output": self.output.__dict__,
        }

    def last_user_message(self) -> str:
        """The text a semantic cache compares: the last user turn (or the raw prompt)."""
        if self.prompt is not None:
            return self.prompt
        users = [m.content for m in self.messages or () if m.role == "user"]
        return users[-1] if users else ""


def parse_input(request: Request, max_chars: int) -> GenerationInput:
    """INVALID_ARGUMENT naming the field for anything a backend would choke on."""
    has_messages, has_prompt = len(request.messages) > 0, request.prompt != ""
    require(has_messages != has_prompt, "messages", "set exactly one of messages and prompt")
    messages: tuple[Message, ...] | None = None
    chars = len(request.prompt)
    if has_messages:
        parsed = []
        for i, message in enumerate(request.messages):
            role = ROLES.get(message.role)
            require(role is not None, f"messages[{i}].role", "must be set to a known role")
            assert role is not None
            parsed.append(Message(role, message.content, message.name))
            chars += len(message.content)
        require(
            any(m.role != "system" for m in parsed),
            "messages",
            "needs at least one message that is not a system message",
        )
        messages = tuple(parsed)
    else:
        require(bool(request.prompt.strip()), "prompt", "must not be blank")
    require(
        chars <= max_chars,
        "messages" if has_messages else "prompt",
        f"{chars} characters; at most {max_chars} per request",
    )
    return GenerationInput(
        messages=messages,
        prompt=request.prompt if has_prompt else None,
        sampling=_parse_sampling(request.params),
        output=_parse_output(request.response_format),
    )


def _parse_sampling(params: generation_pb2.SamplingParams) -> Sampling:
    require(params.max_tokens >= 0, "params.max_tokens", "must be 0 (server default) or positive")
    if params.HasField("temperature"):
        require(
            0 <= params.temperature <= 100,
            "params.temperature",
            "must be between 0 (greedy) and 100",
        )
    if params.HasField("top_p"):
        require(0 < params.top_p <= 1, "params.top_p", "must be in (0, 1]")
    require(params.top_k >= 0, "params.top_k", "must be 0 (off) or positive")
    if params.HasField("repetition_penalty"):
        require(params.repetition_penalty > 0, "params.repetition_penalty", "must be positive")
    require(
        len(params.stop) <= MAX_STOP_SEQUENCES,
        "params.stop",
        f"at most {MAX_STOP_SEQUENCES} stop sequences",
    )
    for i, stop in enumerate(params.stop):
        require(stop != "", f"params.stop[{i}]", "must not be empty")
    if params.HasField("seed"):
        require(0 <= params.seed <= MAX_SEED, "params.seed", f"must be in [0, {MAX_SEED}]")
    return Sampling(
        max_tokens=params.max_tokens or None,
        temperature=_rounded(params.temperature) if params.HasField("temperature") else None,
        top_p=_rounded(params.top_p) if params.HasField("top_p") else None,
        top_k=params.top_k or None,
        repetition_penalty=(
            _rounded(params.repetition_penalty) if params.HasField("repetition_penalty") else None
        ),
        stop=tuple(params.stop),
        seed=params.seed if params.HasField("seed") else None,
    )


def _rounded(value: float) -> float:
    """A float32 field as the decimal the caller wrote (0.7, not 0.699999988079071)."""
    return float(f"{value:.7g}")


def _parse_output(response_format: generation_pb2.ResponseFormat) -> OutputFormat:
    kind = _OUTPUT_KINDS.get(response_format.type)
    require(kind is not None, "response_format.type", "unknown type")
    assert kind is not None
    which = response_format.WhichOneof("schema")
    name = response_format.schema_name or "response"
    if kind != "json_schema":
        require(which is None, f"response_format.{which}", f"only for JSON_SCHEMA, not {kind}")
    if kind != "regex":
        require(response_format.regex == "", "response_format.regex", "only for type REGEX")
    if kind == "json_schema":
        require(which is not None, "response_format.json_schema", "JSON_SCHEMA needs a schema")
        if which == "json_schema":
            try:
                schema = json.loads(response_format.json_schema)
            except json.JSONDecodeError as exc:
                require(False, "response_format.json_schema", f"not valid JSON: {exc}")
            require(
                isinstance(schema, dict),
                "response_format.json_schema",
                "must be a JSON object (a JSON schema)",
            )
        else:
            schema = json_format.MessageToDict(response_format.json_schema_struct)
        return OutputFormat(kind, schema=schema, name=name)
    if kind == "regex":
        require(response_format.regex != "", "response_format.regex", "REGEX needs a pattern")
        try:
            re.compile(response_format.regex)
        except re.error as exc:
            require(False, "response_format.regex", f"not a valid regular expression: {exc}")
        return OutputFormat(kind, regex=response_format.regex, name=name)
    return OutputFormat(kind, name=name)


# --- what a generation produces ------------------------------------------------------------


@dataclass(frozen=True)
class Delta:
    """Text produced since the previous event."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The end of a generation; `error` says why when reason is FINISH_REASON_ERROR."""

    reason: generation_pb2.FinishReason.ValueType
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


StreamEvent = Delta | Finished
