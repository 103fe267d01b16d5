"""The protobuf contracts: buf lint passes and the committed Python stubs are current."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, TOOLS


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "proto" / "generate.py"), str(tmp_path)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed_dir = REPO / "services"
    committed = sorted(
        p.relative_to(committed_dir) for p in (committed_dir / "daert" / "v1").glob("*_pb2*")
    )
    assert generated == committed, "stubs added or removed: run `make proto`"
    stale = [
        str(p) for p in generated if not filecmp.cmp(tmp_path / p, committed_dir / p, shallow=False)
    ]
    assert not stale, f"stale generated code, run `make proto`: {stale}"


def test_buf_lint_passes() -> None:
    buf = TOOLS / "buf"
    if not buf.exists():
        pytest.fail("buf is missing: run `make setup` (it builds it with go install)")
    result = subprocess.run(
        [str(buf), "lint"], cwd=REPO / "proto", capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_service_contract_is_present() -> None:
    from daert.v1 import (
        context_pb2,
        embedding_pb2,
        generation_pb2,
        lora_pb2,
        rerank_pb2,
        retrieval_pb2,
        sandbox_pb2,
    )

    expected = {
        embedding_pb2: ("EmbeddingService", {"Embed", "ListModels"}),
        retrieval_pb2: (
            "RetrievalService",
            {
                "CreateCollection",
                "DeleteCollection",
                "ListCollections",
                "Upsert",
                "Search",
                "Delete",
                "ListDocuments",  # what ingestion compares content hashes against
            },
        ),
        rerank_pb2: ("RerankService", {"Rerank"}),
        generation_pb2: ("GenerationService", {"Generate", "GenerateStream", "ListModels"}),
        sandbox_pb2: ("SandboxService", {"Execute", "CreateSession", "CloseSession"}),
        context_pb2: ("ContextService", {"Compress", "CountTokens"}),
        lora_pb2: (
            "LoraRouterService",
            {"RegisterAdapter", "DeleteAdapter", "ListAdapters", "Route"},
        ),
    }
    for module, (service, rpcs) in expected.items():
        methods = set(module.DESCRIPTOR.services_by_name[service].methods_by_name)
        assert rpcs <= methods, f"{service} lacks {rpcs - methods}"
