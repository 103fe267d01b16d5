"""What the generation tests share: the fake inference servers, a generation server in
front of them, and request builders."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import grpc
import pytest
from daert.clients import GenerationClient
from daert.v1 import common_pb2, generation_pb2
from prometheus_client.parser import text_string_to_metric_families

# A ChatML-style template, as in many Hugging Face tokenizer configs.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def render_chat(messages: list[tuple[str, str]]) -> str:
    """What CHAT_TEMPLATE makes of `messages` (role, content)."""
    turns = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    return turns + "<|im_start|>assistant\n"


def user(text: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)


def request(
    model: str,
    text: str = "hello there",
    *,
    stream: bool = False,
    prompt: bool = False,
    **fields: Any,
) -> Any:
    """A GenerateRequest (or GenerateStreamRequest), greedy unless `params` says otherwise."""
    fields.setdefault("params", generation_pb2.SamplingParams(temperature=0))
    content = {"prompt": text} if prompt else {"messages": [user(text)]}
    cls = generation_pb2.GenerateStreamRequest if stream else generation_pb2.GenerateRequest
    return cls(model=model, **content, **fields)


async def rpc_error(client: GenerationClient, req: Any) -> grpc.aio.AioRpcError:
    """The status `req` fails with, through GenerateStream or Generate as its type says."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if isinstance(req, generation_pb2.GenerateStreamRequest):
            [message async for message in client.stub.GenerateStream(req)]
        else:
            await client.stub.Generate(req)
    return caught.value


def assert_ended_by_error(messages: list[Any], text: str, error: str) -> None:
    """A stream that failed after delivering `text`: its last message says so, and why."""
    assert "".join(m.delta for m in messages) == text
    assert messages[-1].finish_reason == generation_pb2.FINISH_REASON_ERROR
    assert error in messages[-1].error


def metric(metrics_port: int, name: str, **labels: str) -> float:
    """The value of one Prometheus sample on a server's /metrics (0 when absent)."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def models_env(*models: dict[str, Any], **settings: Any) -> dict[str, str]:
    env = {"DAERT_GENERATION_MODELS": json.dumps(list(models))}
    env.update({f"DAERT_GENERATION_{k.upper()}": str(v) for k, v in settings.items()})
    return env
