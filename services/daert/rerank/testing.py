"""A BERT cross-encoder with random weights, built on the spot: for tests and benchmarks.

No model can be downloaded here, and none is needed to exercise the real loading and
scoring path: `build_cross_encoder` writes a WordPiece vocabulary, a
`BertForSequenceClassification` with one label and its tokenizer into a folder that the
cross-encoder backend (and sentence-transformers' `CrossEncoder`) loads like any other.

    build_cross_encoder(tmp / "ce", words=["rotate", "keys"])            # tiny: tests
    build_cross_encoder(tmp / "ce", hidden_size=384, layers=6, heads=12,
                        intermediate_size=1536)                          # MiniLM-L6-sized
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _vocabulary(words: Iterable[str]) -> list[str]:
    # Whole words where given; otherwise single characters and their "##" continuations, so
    # any lower-case ASCII text tokenizes to real ids rather than [UNK].
    chars = string.ascii_lowercase + string.digits
    known = sorted({w.lower() for w in words} - set(chars) - set(SPECIAL_TOKENS))
    return [
        *SPECIAL_TOKENS,
        *known,
        *chars,
        *(f"##{c}" for c in chars),
        *string.punctuation,
    ]


def build_cross_encoder(
    folder: Path,
    *,
    words: Iterable[str] = (),
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 128,
    seed: int = 0,
) -> int:
    """Write the model and its tokenizer into `folder`; return its parameter count."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(_vocabulary(words)) + "\n")
    # transformers 5: BertTokenizer is the fast (tokenizers) one; it takes `vocab=`.
    tokenizer = BertTokenizer(vocab=str(vocab_file), do_lower_case=True)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        # Wider than BERT's 0.02, so random logits spread instead of all sitting near 0.
        initializer_range=0.2,
    )
    config.num_labels = 1  # one relevance logit
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return int(model.num_parameters())
