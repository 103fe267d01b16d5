"""Local fakes of the embedding backends' HTTP APIs (TEI and Ollama), for tests.

Each fake is a real HTTP server on 127.0.0.1 (random port) running in a background
thread, so it serves sync tests, async tests and server subprocesses alike::

    with FakeTEI(dimensions=8) as tei:
        httpx.post(f"{tei.url}/embed", json={"inputs": "hi"})
"""

from .http_fake import FakeHTTPServer, RecordedRequest
from .ollama import FakeOllama
from .tei import TEI_STATUS, FakeTEI

__all__ = ["TEI_STATUS", "FakeHTTPServer", "FakeOllama", "FakeTEI", "RecordedRequest"]
