"""Generated protobuf and gRPC stubs for the daert.v1 contracts (`make proto`; do not edit)."""
