"""One-machine stand-ins for the stack's data services (`make up`, tests): embedded
PostgreSQL + pgvector. On Kubernetes these are StatefulSets or managed services."""
