"""The OpenAI-compatible REST gateway: the stack's face to the openai SDK and the frameworks
built on it. It authenticates API keys, enforces their limits, and calls the gRPC services
through `daert.clients` only."""
