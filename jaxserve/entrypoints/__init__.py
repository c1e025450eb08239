"""Ways in: the `jaxserve` CLI (`cli`), the server process that runs gRPC and HTTP over one
AsyncLLM (`server`), the gRPC services (`grpc/`: jaxserve.v1 and JetStream's
Orchestrator), the OpenAI-compatible HTTP API (`openai/`), the gRPC clients (`client`), the
serving benchmark (`bench`) and multi-host start-up (`distributed`).

May import everything below it (engine/, core/, worker/, models/); nothing imports it but
the top-level lazy exports of `jaxserve`.
"""
