"""Small helpers shared by test modules."""

from __future__ import annotations

import json
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / ".tools" / "bin"


def models_env(*models: dict[str, object]) -> dict[str, str]:
    """DAERT_EMBEDDING_MODELS for the given model entries."""
    return {"DAERT_EMBEDDING_MODELS": json.dumps(list(models))}


def free_port() -> int:
    """A port nothing listens on right now (for fakes that must restart on the same port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
