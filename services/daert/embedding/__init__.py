"""The embedding service (daert.v1.EmbeddingService): text to vectors, micro-batched."""
