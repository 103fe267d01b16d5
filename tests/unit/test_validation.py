"""reject_nul: every string of a request, however deep, is checked for NUL characters;
decoder: request bytes that do not parse are named by the field that holds them."""

from __future__ import annotations

import pytest
from daert.runtime.errors import InvalidArgument
from daert.runtime.validation import Undecodable, check_request, decoder, reject_nul
from daert.v1 import common_pb2, context_pb2, embedding_pb2, retrieval_pb2, sandbox_pb2

from tests.fuzz.strategies import at_path, deep_struct_bytes


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


# Minimal examples the fuzz suite found (they were answered UNKNOWN, "Unexpected DecodeError").
LONE_SURROGATE_INPUT = b"\n\x05x\xed\xa0\x80y"  # EmbedRequest.inputs[0] = "x" U+D800 "y"


def test_invalid_utf8_is_named_by_its_field() -> None:
    decode = decoder(embedding_pb2.EmbedRequest.FromString)
    assert decode(LONE_SURROGATE_INPUT) == Undecodable("inputs[0]")
    assert decode(b"\x12\x01\xff") == Undecodable("model")
    assert decode(b"\x12\x02ok") == embedding_pb2.EmbedRequest(model="ok")


def test_nesting_past_the_recursion_limit_names_the_struct() -> None:
    # SearchRequest.filter holding a Struct nested 150 lists deep.
    filter_field = retrieval_pb2.SearchRequest.DESCRIPTOR.fields_by_name["filter"]
    wire = at_path((filter_field,), deep_struct_bytes(150))
    assert decoder(retrieval_pb2.SearchRequest.FromString)(wire) == Undecodable("filter")


def test_undecodable_requests_are_invalid_argument() -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_request(Undecodable("chunks[0].metadata"))
    assert caught.value.field == "chunks[0].metadata"
