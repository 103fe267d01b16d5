"""Typed async clients for the services whose contract needs no convenience helpers:
use `client.stub.<Rpc>(request)`, typed by the generated stubs."""

from __future__ import annotations

from daert.clients.base import ServiceClient
from daert.v1 import (
    context_pb2_grpc,
    generation_pb2_grpc,
    lora_pb2_grpc,
    rerank_pb2_grpc,
    retrieval_pb2_grpc,
    sandbox_pb2_grpc,
)


class GenerationClient(ServiceClient):
    service, full_name = "generation", "daert.v1.GenerationService"
    stub_class = generation_pb2_grpc.GenerationServiceStub
    stub: generation_pb2_grpc.GenerationServiceAsyncStub


class RetrievalClient(ServiceClient):
    service, full_name = "retrieval", "daert.v1.RetrievalService"
    stub_class = retrieval_pb2_grpc.RetrievalServiceStub
    stub: retrieval_pb2_grpc.RetrievalServiceAsyncStub


class RerankClient(ServiceClient):
    service, full_name = "rerank", "daert.v1.RerankService"
    stub_class = rerank_pb2_grpc.RerankServiceStub
    stub: rerank_pb2_grpc.RerankServiceAsyncStub


class SandboxClient(ServiceClient):
    service, full_name = "sandbox", "daert.v1.SandboxService"
    stub_class = sandbox_pb2_grpc.SandboxServiceStub
    stub: sandbox_pb2_grpc.SandboxServiceAsyncStub


class ContextClient(ServiceClient):
    service, full_name = "context", "daert.v1.ContextService"
    stub_class = context_pb2_grpc.ContextServiceStub
    stub: context_pb2_grpc.ContextServiceAsyncStub


class LoraRouterClient(ServiceClient):
    service, full_name = "lora", "daert.v1.LoraRouterService"
    stub_class = lora_pb2_grpc.LoraRouterServiceStub
    stub: lora_pb2_grpc.LoraRouterServiceAsyncStub
