"""The shared service runtime: every daert gRPC server is built from these pieces.

`server.serve()` starts a grpc.aio server for one service with health, reflection, metrics,
request ids, JSON logs, error mapping and a graceful drain on SIGTERM. Services only provide
the servicer, their settings and a readiness check (see `service.Service`).
"""
