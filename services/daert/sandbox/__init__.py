"""The sandbox service (daert.v1.SandboxService): run untrusted, LLM-written Python isolated."""
