"""daert: gRPC services for an open LLM application stack."""

__version__ = "0.1.0"
