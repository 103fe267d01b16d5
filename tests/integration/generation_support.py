"""What the generation tests share: the fake inference servers, a generation server in
front of them, and request builders."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

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
