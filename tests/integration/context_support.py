"""What the context tests share: a small Hugging Face tokenizer made here (with a chat
template), conversations, and request builders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from daert.v1 import common_pb2, context_pb2

ROLES = {
    "system": common_pb2.ROLE_SYSTEM,
    "user": common_pb2.ROLE_USER,
    "assistant": common_pb2.ROLE_ASSISTANT,
    "tool": common_pb2.ROLE_TOOL,
}
# A ChatML-like template that trims contents, as many real ones do.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|turn|>{{ m['role'] }}\n{{ m['content'] | trim }}"
    "<|end|>\n{% endfor %}{% if add_generation_prompt %}<|turn|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Ada Lovelace wrote the first program; Alan Turing defined computability in 1936.",
    "Order 4471 ships to Lisbon on Tuesday; the invoice total is 1,250 euros.",
    "user assistant system tool: call lookup(city) returned sunny, 21 degrees.",
]


def make_tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer trained on a few sentences, saved as a Hugging Face
    tokenizer folder with a chat template: real loading code, a model made here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=["<unk>", "<bos>", "<|turn|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return folder


def tokenizers_env(**entries: dict[str, Any]) -> str:
    return json.dumps([{"name": name, **entry} for name, entry in entries.items()])


def msg(role: str, content: str, name: str = "") -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=ROLES[role], content=content, name=name)


def conversation(turns: int, *, system: str = "You are a helpful travel agent.") -> list[Any]:
    """A system prompt and `turns` alternating user/assistant messages, each distinct."""
    messages = [msg("system", system)] if system else []
    for i in range(turns):
        fact = CORPUS[i % len(CORPUS)]
        if i % 2 == 0:
            messages.append(msg("user", f"Question {i}: tell me about item {i}. {fact}"))
        else:
            messages.append(msg("assistant", f"Answer {i}: item {i} is noted. {fact}"))
    return messages


def compress(messages: list[Any], budget: int, **fields: Any) -> context_pb2.CompressRequest:
    return context_pb2.CompressRequest(messages=messages, token_budget=budget, **fields)


def texts(messages: Any) -> list[tuple[str, str]]:
    names = {v: k for k, v in ROLES.items()}
    return [(names[m.role], m.content) for m in messages]
