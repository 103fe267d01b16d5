"""The generation service: a streaming proxy to LLM inference servers, with a Redis
response cache and LoRA adapter routing."""
