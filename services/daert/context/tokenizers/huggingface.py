"""A Hugging Face tokenizer folder loaded in process (transformers): its tokenizer.json and
the chat template of its tokenizer_config.json, exactly as `apply_chat_template` uses them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from daert.context.messages import Message
from daert.context.tokenizers.base import TemplatedTokenizer, Tokens
from daert.runtime.errors import InvalidArgument, Unavailable


class HuggingFaceTokenizer(TemplatedTokenizer):
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self._tokenizer: Any = None

    async def start(self) -> None:
        try:
            self._tokenizer = await asyncio.to_thread(self._load)
        except Exception as exc:  # reported by readiness and by every call
            self.unavailable_reason = f"tokenizer {self.name!r} at {self.path}: {exc}"
        else:
            self.unavailable_reason = ""

    def _load(self) -> Any:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        if not tokenizer.is_fast:
            raise ValueError("needs a fast tokenizer (tokenizer.json) for token offsets")
        if not tokenizer.chat_template:
            raise ValueError("has no chat_template: counts must include the model's template")
        return tokenizer

    def _loaded(self) -> Any:
        if self._tokenizer is None:
            raise Unavailable(self.unavailable_reason or f"tokenizer {self.name!r} is loading")
        return self._tokenizer

    async def render(self, messages: Sequence[Message]) -> str:
        from jinja2 import TemplateError

        tokenizer = self._loaded()
        try:
            return str(
                tokenizer.apply_chat_template(
                    [m.template_dict() for m in messages],
                    tokenize=False,
                    add_generation_prompt=True,
                )
            )
        except TemplateError as exc:
            raise InvalidArgument("messages", f"the chat template of {self.name!r}: {exc}") from exc

    async def tokenize(self, text: str, *, prompt: bool = False) -> Tokens:
        tokenizer = self._loaded()
        # Chat templates write their special tokens themselves (apply_chat_template adds
        # none), so a prompt is tokenized like any other text.
        encoded = await asyncio.to_thread(
            tokenizer, text, add_special_tokens=False, return_offsets_mapping=True
        )
        return Tokens(list(encoded["input_ids"]), [s for s, _ in encoded["offset_mapping"]])

    async def detokenize(self, ids: Sequence[int]) -> str:
        return str(self._loaded().decode(list(ids)))

    async def check_ready(self) -> bool:
        self.ready = self._tokenizer is not None
        return self.ready
