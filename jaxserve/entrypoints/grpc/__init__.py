"""gRPC front end: `server` (jaxserve.v1.GenerationService, health, reflection), the
JetStream Orchestrator API (`jetstream_service`), admission and auth shared by both
(`common`) and proto <-> Python conversion (`convert`, also used by the clients). The
generated stubs live in `jaxserve.protos`."""
