"""Hostile requests, built from the message descriptors, to every unary and server-streaming
RPC of every service, on real servers with their real backends.

Each reply is OK or a deliberate status (INVALID_ARGUMENT with a BadRequest violation naming
a field, NOT_FOUND, ...), never INTERNAL or UNKNOWN, never later than its deadline; after an
RPC's examples the server is still SERVING. DAERT_FUZZ_EXAMPLES sets the examples per RPC
(`make fuzz` sets many more).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import pkgutil
import time

import daert.v1
import grpc
import pytest
from daert.clients import field_violations
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from hypothesis import given, settings

from tests.fuzz.conftest import TARGETS, FuzzTarget
from tests.fuzz.strategies import requests

EXAMPLES = int(os.environ.get("DAERT_FUZZ_EXAMPLES", "20"))
DEADLINE_S = 10.0
# How late a DEADLINE_EXCEEDED (or any reply) may come: scheduling on a loaded machine.
SLACK_S = 2.0
DELIBERATE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


def _services() -> list[ServiceDescriptor]:
    modules = (
        importlib.import_module(f"daert.v1.{module.name}")
        for module in pkgutil.iter_modules(daert.v1.__path__)
        if module.name.endswith("_pb2")
    )
    return [service for m in modules for service in m.DESCRIPTOR.services_by_name.values()]


SERVICES = _services()
METHODS = [method for service in SERVICES for method in service.methods]


def test_every_method_of_every_service_is_fuzzed() -> None:
    assert SERVICES, "no daert.v1 service descriptors found"
    assert sorted(TARGETS) == sorted(service.full_name for service in SERVICES)
    # Client streaming needs a strategy of request streams, which this suite does not have.
    assert [m.full_name for m in METHODS if m.client_streaming] == []
    assert len(METHODS) == sum(len(service.methods) for service in SERVICES)


async def _call(address: str, method: MethodDescriptor, wire: bytes) -> grpc.aio.AioRpcError | None:
    """Send `wire` as the request, read every reply (decoding them: a reply the contract
    cannot parse fails too); the error, or None."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    codec = {
        "request_serializer": lambda raw: raw,
        "response_deserializer": message_factory.GetMessageClass(method.output_type).FromString,
    }
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            if method.server_streaming:
                async for _ in channel.unary_stream(path, **codec)(wire, timeout=DEADLINE_S):
                    pass
            else:
                await channel.unary_unary(path, **codec)(wire, timeout=DEADLINE_S)
        except grpc.aio.AioRpcError as error:
            return error
    return None


def _shown(method: MethodDescriptor, wire: bytes) -> str:
    try:
        request = message_factory.GetMessageClass(method.input_type).FromString(wire)
    except Exception as error:  # the wire bytes are the request: what matters is what they are
        return f"undecodable ({error}): {wire[:300]!r}"
    return repr(str(request)[:600])


def check(method: MethodDescriptor, wire: bytes, address: str) -> None:
    started = time.monotonic()
    error = asyncio.run(_call(address, method, wire))
    elapsed = time.monotonic() - started
    where = f"{method.full_name} on {_shown(method, wire)}"
    assert elapsed <= DEADLINE_S + SLACK_S, f"{where}: replied after {elapsed:.1f} s"
    if error is None:
        return
    code = error.code()
    assert code in DELIBERATE, f"{where}: {code.name}: {error.details()}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        violations = field_violations(error)
        assert violations and all(violations), f"{where}: no field named: {error.details()}"


@pytest.mark.timeout(EXAMPLES * (DEADLINE_S + SLACK_S) + 300)
@pytest.mark.parametrize("method", METHODS, ids=[m.full_name for m in METHODS])
def test_hostile_requests(method: MethodDescriptor, request: pytest.FixtureRequest) -> None:
    target: FuzzTarget = request.getfixturevalue(TARGETS[method.containing_service.full_name])
    with grpc.insecure_channel(target.server.target) as channel:
        target.prepare(channel)

    @settings(max_examples=max(3, round(EXAMPLES * target.share)))
    @given(requests(method.input_type, target.overrides))
    def survives(wire: bytes) -> None:
        check(method, wire, target.server.target)

    survives()
    assert target.server.health() == "SERVING"
