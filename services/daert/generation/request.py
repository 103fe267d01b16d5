"""A generation request, validated once into plain values every backend reads, and the
events a generation produces."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
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
ToolChoiceKind = Literal["auto", "none", "required", "function"]
_TOOL_CHOICES: dict[int, ToolChoiceKind] = {
    generation_pb2.TOOL_CHOICE_MODE_UNSPECIFIED: "auto",
    generation_pb2.TOOL_CHOICE_MODE_AUTO: "auto",
    generation_pb2.TOOL_CHOICE_MODE_NONE: "none",
    generation_pb2.TOOL_CHOICE_MODE_REQUIRED: "required",
    generation_pb2.TOOL_CHOICE_MODE_FUNCTION: "function",
}
# OpenAI's rule for function names; the other servers take what OpenAI takes.
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
MAX_TOOLS = 128
# OpenAI's limit on top_logprobs; vLLM's default --max-logprobs is the same.
MAX_TOP_LOGPROBS = 20
_OUTPUT_KINDS: dict[int, OutputKind] = {
    generation_pb2.RESPONSE_FORMAT_TYPE_UNSPECIFIED: "text",
    generation_pb2.RESPONSE_FORMAT_TYPE_TEXT: "text",
    generation_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT: "json_object",
    generation_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA: "json_schema",
    generation_pb2.RESPONSE_FORMAT_TYPE_REGEX: "regex",
}

Request = generation_pb2.GenerateRequest | generation_pb2.GenerateStreamRequest


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # the JSON text of an object


@dataclass(frozen=True)
class Message:
    role: str  # system, user, assistant, tool
    content: str
    name: str = ""
    tool_calls: tuple[ToolCall, ...] = ()  # assistant messages only
    tool_call_id: str = ""  # tool messages only: the call answered

    def canonical(self) -> list[Any]:
        # Tool fields only when set, so the cache keys of requests without tools stay as
        # they were before tool calling existed.
        fields: list[Any] = [self.role, self.content, self.name]
        if self.tool_calls or self.tool_call_id:
            fields += [[[c.id, c.name, c.arguments] for c in self.tool_calls], self.tool_call_id]
        return fields


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None  # the arguments' JSON schema
    strict: bool = False


@dataclass(frozen=True)
class ToolChoice:
    kind: ToolChoiceKind = "auto"
    function: str = ""  # kind "function" only


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
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per position; only with logprobs

    @property
    def uses_tools(self) -> bool:
        """Tools offered, or a conversation that already holds tool calls or results."""
        return bool(self.tools) or any(
            m.tool_calls or m.role == "tool" for m in self.messages or ()
        )

    def canonical(self) -> dict[str, Any]:
        """Every field that changes the answer, as JSON-ready values (the cache key)."""
        canonical: dict[str, Any] = {
            "messages": [m.canonical() for m in self.messages or ()],
            "prompt": self.prompt,
            "sampling": self.sampling.__dict__ | {"stop": list(self.sampling.stop)},
            "output": self.output.__dict__,
        }
        if self.tools:  # absent without tools: earlier cache keys stay valid
            canonical["tools"] = [tool.__dict__ for tool in self.tools]
            canonical["tool_choice"] = self.tool_choice.__dict__
        if self.logprobs:  # absent without them, as tools: earlier cache keys stay valid
            canonical["logprobs"] = self.top_logprobs
        return canonical

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
            parsed.append(_parse_message(message, f"messages[{i}]"))
            chars += len(message.content) + sum(len(c.arguments) for c in message.tool_calls)
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
    require(
        has_messages or not request.tools,
        "tools",
        "tools need messages: a raw prompt has no chat template to present them",
    )
    tools = _parse_tools(request.tools)
    require(
        0 <= request.top_logprobs <= MAX_TOP_LOGPROBS,
        "top_logprobs",
        f"must be between 0 and {MAX_TOP_LOGPROBS}",
    )
    require(
        request.logprobs or request.top_logprobs == 0,
        "top_logprobs",
        "needs logprobs set",
    )
    return GenerationInput(
        messages=messages,
        prompt=request.prompt if has_prompt else None,
        sampling=_parse_sampling(request.params),
        output=_parse_output(request.response_format),
        tools=tools,
        tool_choice=_parse_tool_choice(request.tool_choice, tools),
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs,
    )


def _parse_message(message: common_pb2.ChatMessage, where: str) -> Message:
    role = ROLES.get(message.role)
    require(role is not None, f"{where}.role", "must be set to a known role")
    assert role is not None
    if role == "tool":
        require(
            message.tool_call_id != "",
            f"{where}.tool_call_id",
            "a tool message must name the tool call it answers",
        )
    else:
        require(message.tool_call_id == "", f"{where}.tool_call_id", "only for ROLE_TOOL messages")
    if role != "assistant":
        require(
            len(message.tool_calls) == 0,
            f"{where}.tool_calls",
            "only assistant messages carry tool calls",
        )
    calls = []
    for j, call in enumerate(message.tool_calls):
        at = f"{where}.tool_calls[{j}]"
        require(call.id != "", f"{at}.id", "must not be empty")
        require(call.name != "", f"{at}.name", "must not be empty")
        try:
            arguments = json.loads(call.arguments)
        except json.JSONDecodeError as exc:
            require(False, f"{at}.arguments", f"not valid JSON: {exc}")
        require(isinstance(arguments, dict), f"{at}.arguments", "must be a JSON object")
        calls.append(ToolCall(call.id, call.name, call.arguments))
    return Message(role, message.content, message.name, tuple(calls), message.tool_call_id)


def _parse_tools(tools: Sequence[generation_pb2.Tool]) -> tuple[Tool, ...]:
    require(len(tools) <= MAX_TOOLS, "tools", f"at most {MAX_TOOLS} tools")
    parsed: list[Tool] = []
    for i, tool in enumerate(tools):
        require(
            TOOL_NAME.fullmatch(tool.name) is not None,
            f"tools[{i}].name",
            "must be 1 to 64 letters, digits, underscores or dashes",
        )
        require(
            all(t.name != tool.name for t in parsed),
            f"tools[{i}].name",
            f"{tool.name!r} is declared twice",
        )
        parameters = (
            json_format.MessageToDict(tool.parameters) if tool.HasField("parameters") else None
        )
        parsed.append(Tool(tool.name, tool.description, parameters, tool.strict))
    return tuple(parsed)


def _parse_tool_choice(choice: generation_pb2.ToolChoice, tools: tuple[Tool, ...]) -> ToolChoice:
    kind = _TOOL_CHOICES.get(choice.mode)
    require(kind is not None, "tool_choice.mode", "unknown mode")
    assert kind is not None
    if kind in ("required", "function"):
        require(bool(tools), "tool_choice.mode", f"{kind.upper()} needs tools")
    if kind != "function":
        require(
            choice.function_name == "",
            "tool_choice.function_name",
            "only for TOOL_CHOICE_MODE_FUNCTION",
        )
        return ToolChoice(kind)
    require(
        any(t.name == choice.function_name for t in tools),
        "tool_choice.function_name",
        f"{choice.function_name!r} is not one of the request's tools",
    )
    return ToolChoice(kind, choice.function_name)


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
class TokenLogprob:
    """One generated token's log probability, and the most likely tokens at its position
    (token, logprob), most likely first."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """Text produced since the previous event, and the log probabilities of its tokens when
    the request asked for them (a delta may carry them with no text: tokens whose text is
    held back while it may still become a stop sequence)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of tool call `index`: id and name on its first piece, then arguments."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True)
class Finished:
    """The end of a generation; `error` says why when reason is FINISH_REASON_ERROR."""

    reason: generation_pb2.FinishReason.ValueType
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""


StreamEvent = Delta | ToolCallDelta | Finished


def merge_deltas(deltas: Sequence[Delta]) -> Delta:
    """Consecutive deltas as one: their texts and their tokens' log probabilities, in order."""
    return Delta("".join(d.text for d in deltas), tuple(lp for d in deltas for lp in d.logprobs))


def assemble_tool_calls(deltas: Sequence[ToolCallDelta]) -> tuple[ToolCall, ...]:
    """The whole calls that `deltas` spell, in index order."""
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        call = calls.setdefault(delta.index, ["", "", ""])
        call[0] = call[0] or delta.id
        call[1] = call[1] or delta.name
        call[2] += delta.arguments
    return tuple(ToolCall(*calls[i]) for i in sorted(calls))


def whole_calls(calls: Sequence[ToolCall]) -> list[ToolCallDelta]:
    """Each whole call as its one delta (unary answers and cache replays)."""
    return [ToolCallDelta(i, c.id, c.name, c.arguments) for i, c in enumerate(calls)]
