"""Tokenizers the context service counts with, one module per kind."""

from __future__ import annotations

from daert.context.config import TokenizerConfig
from daert.context.tokenizers.base import Counted, TemplatedTokenizer


def create_tokenizer(config: TokenizerConfig) -> TemplatedTokenizer:
    if config.kind == "llama_cpp":
        from daert.context.tokenizers.llama_cpp import LlamaCppTokenizer

        assert config.url is not None  # checked by TokenizerConfig
        return LlamaCppTokenizer(config.name, config.url, config.timeout_s)
    from daert.context.tokenizers.huggingface import HuggingFaceTokenizer

    assert config.path is not None
    return HuggingFaceTokenizer(config.name, config.path)


__all__ = ["Counted", "TemplatedTokenizer", "create_tokenizer"]
