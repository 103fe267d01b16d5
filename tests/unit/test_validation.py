"""reject_nul: every string of a request, however deep, is checked for NUL characters."""

from __future__ import annotations

import pytest
from daert.runtime.errors import InvalidArgument
from daert.runtime.validation import reject_nul
from daert.v1 import common_pb2, context_pb2, retrieval_pb2, sandbox_pb2


def nul_field(request: object) -> str:
    with pytest.raises(InvalidArgument) as caught:
        reject_nul(request)  # type: ignore[arg-type]
    return caught.value.field


def test_a_clean_request_passes() -> None:
    text = "line\nbreak\ttab, ünïcode, 日本語 \x01 and other control characters"
    reject_nul(context_pb2.CompressRequest(messages=[common_pb2.ChatMessage(content=text)]))


def test_scalar_repeated_and_nested_strings_are_named() -> None:
    assert nul_field(retrieval_pb2.SearchRequest(collection="c\x00")) == "collection"
    messages = [common_pb2.ChatMessage(content="ok"), common_pb2.ChatMessage(name="n\x00")]
    assert nul_field(context_pb2.CountTokensRequest(messages=messages)) == "messages[1].name"
    deletion = retrieval_pb2.DeleteRequest(collection="c", ids=["a", "b\x00"])
    assert nul_field(deletion) == "ids[1]"


def test_struct_values_and_keys_are_checked() -> None:
    upsert = retrieval_pb2.UpsertRequest(collection="c")
    upsert.chunks.add(id="1").metadata.update({"tags": ["x", "y\x00"]})
    assert nul_field(upsert).startswith("chunks[0].metadata.fields['tags']")
    keyed = retrieval_pb2.UpsertRequest(collection="c")
    keyed.chunks.add(id="1").metadata.update({"bad\x00key": 1})
    assert nul_field(keyed) == "chunks[0].metadata.fields"


def test_bytes_may_hold_nul() -> None:
    data = sandbox_pb2.SandboxFile(path="data.bin", content=b"\x00\x01")
    reject_nul(sandbox_pb2.ExecuteRequest(code="print(1)", files=[data]))
    named = sandbox_pb2.SandboxFile(path="da\x00ta.bin", content=b"")
    assert nul_field(sandbox_pb2.ExecuteRequest(code="1", files=[named])) == "files[0].path"
