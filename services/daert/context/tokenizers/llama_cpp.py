"""A llama.cpp server's own tokenizer and chat template, over its HTTP API: counts are those
of the server that reads the conversation (`/apply-template`, `/tokenize` with pieces,
`/detokenize`, `/health`)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from typing import Any

from daert.context.messages import Message
from daert.context.tokenizers.base import TemplatedTokenizer, Tokens
from daert.runtime.errors import ServiceError
from daert.runtime.upstream import http_client, json_body, send


def _piece_bytes(piece: Any) -> bytes:
    """A piece is text, or a list of byte values when it is not valid UTF-8 on its own."""
    return bytes(piece) if isinstance(piece, list) else str(piece).encode()


class LlamaCppTokenizer(TemplatedTokenizer):
    def __init__(self, name: str, url: str, timeout_s: float) -> None:
        super().__init__(name)
        self.url = url
        self._backend = f"llama.cpp server for tokenizer {name!r}"
        self._http = http_client(url, timeout_s)

    async def _post(self, path: str, body: dict[str, Any], invalid_field: str) -> Any:
        response = await send(
            self._http,
            "POST",
            path,
            backend=self._backend,
            url=self.url,
            invalid_field=invalid_field,
            json=body,
        )
        return json_body(response, self._backend)

    async def render(self, messages: Sequence[Message]) -> str:
        body = {"messages": [m.template_dict() for m in messages]}
        return str((await self._post("/apply-template", body, "messages"))["prompt"])

    async def tokenize(self, text: str, *, prompt: bool = False) -> Tokens:
        # A prompt is tokenized with the flags the server reads a prompt with: the model's
        # BOS added, special tokens in the text parsed.
        body = {"content": text, "add_special": prompt, "parse_special": True, "with_pieces": True}
        tokens = (await self._post("/tokenize", body, "messages"))["tokens"]
        ids = [int(token["id"]) for token in tokens]
        byte_ends = list(accumulate(len(_piece_bytes(token["piece"])) for token in tokens))
        # Byte offsets to character offsets of `text`.
        char_at = [i for i, char in enumerate(text) for _ in range(len(char.encode()))]
        char_at.append(len(text))
        byte_starts = [0, *byte_ends[:-1]]
        return Tokens(ids, [char_at[min(b, len(char_at) - 1)] for b in byte_starts])

    async def detokenize(self, ids: Sequence[int]) -> str:
        reply = await self._post("/detokenize", {"tokens": list(ids)}, "messages")
        return str(reply["content"])

    async def check_ready(self) -> bool:
        try:
            await send(
                self._http,
                "GET",
                "/health",
                backend=self._backend,
                url=self.url,
                invalid_field="tokenizer",
            )
        except ServiceError as exc:
            self.ready, self.unavailable_reason = False, exc.message
        else:
            self.ready, self.unavailable_reason = True, ""
        return self.ready

    async def close(self) -> None:
        await self._http.aclose()
