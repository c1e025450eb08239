"""Protocol buffers of the gRPC front end and their generated Python stubs (committed).

    v1/generate.proto   jaxserve.v1.GenerationService: Generate, GenerateStream, Tokenize,
                        GetModelInfo
    jetstream.proto     jetstream_proto.Orchestrator: JetStream's Decode / HealthCheck, wire
                        compatible with JetStream clients

After editing a .proto file, regenerate the stubs with `python -m jaxserve.protos.generate`
(needs grpcio-tools; the generated code needs protobuf >= the protoc it came from).
"""
