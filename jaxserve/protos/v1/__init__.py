"""jaxserve.v1: the versioned gRPC API (see generate.proto)."""
