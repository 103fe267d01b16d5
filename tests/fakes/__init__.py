"""Local fakes of the inference backends' HTTP APIs, for tests.

Embedding/rerank backends: TEI and Ollama (``/api/embed``). LLM inference servers: vLLM's
OpenAI-compatible API (:class:`FakeOpenAI`), Text Generation Inference (:class:`FakeTGI`) and
Ollama (``/api/chat``, ``/api/generate``); the LLM fakes share the deterministic "model"
described in :mod:`tests.fakes.llm`.

Each fake is a real HTTP server on 127.0.0.1 (random port) running in a background
thread, so it serves sync tests, async tests and server subprocesses alike::

    with FakeTEI(dimensions=8) as tei:
        httpx.post(f"{tei.url}/embed", json={"inputs": "hi"})
"""

from .http_fake import FakeHTTPServer, RecordedRequest
from .llm import CANNED_REPLY, JSON_REPLY, FakeLLMServer, Generation
from .ollama import FakeOllama
from .openai import FakeOpenAI
from .tei import TEI_STATUS, FakeTEI
from .tgi import TGI_ERRORS, FakeTGI

__all__ = [
    "CANNED_REPLY",
    "JSON_REPLY",
    "TEI_STATUS",
    "TGI_ERRORS",
    "FakeHTTPServer",
    "FakeLLMServer",
    "FakeOllama",
    "FakeOpenAI",
    "FakeTEI",
    "FakeTGI",
    "Generation",
    "RecordedRequest",
]
