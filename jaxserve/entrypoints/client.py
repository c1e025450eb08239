"""Python clients of the jaxserve gRPC server, sync and async, mirroring `LLM.generate`:

    with Client("127.0.0.1:50051", api_key=...) as client:
        out = client.generate("Hello", SamplingParams(max_tokens=32, temperature=0.0))
        out.outputs[0].text, out.outputs[0].token_ids, out.outputs[0].finish_reason
        for delta in client.generate_stream("Hello", params):   # RequestOutput deltas
            print(delta.outputs[0].text, end="")

    async with AsyncClient("127.0.0.1:50051") as client:
        out = await client.generate("Hello", params)
        async for delta in client.generate_stream("Hello", params): ...

Errors are grpc.RpcError (`.code()`: INVALID_ARGUMENT naming the field, UNAUTHENTICATED,
RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED ...). Leaving a stream early cancels the request on
the server.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import AsyncIterator, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxserve.entrypoints.grpc.convert import request_to_proto, response_from_proto, stream_delta_from_proto
from jaxserve.outputs import RequestOutput
from jaxserve.protos.v1 import generate_pb2 as pb
from jaxserve.protos.v1 import generate_pb2_grpc as pb_grpc
from jaxserve.sampling_params import SamplingParams

Prompt = str | Sequence[int]


def _credentials(tls: bool, root_certificates: bytes | str | Path | None) -> grpc.ChannelCredentials | None:
    if root_certificates is not None:
        if not isinstance(root_certificates, bytes):
            root_certificates = Path(root_certificates).read_bytes()
        return grpc.ssl_channel_credentials(root_certificates)
    return grpc.ssl_channel_credentials() if tls else None


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def _health_status(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class _Base:
    def __init__(self, target: str, *, api_key: str | None = None, tls: bool = False,
                 root_certificates: bytes | str | Path | None = None, timeout: float | None = None,
                 options: Sequence[tuple[str, object]] = ()):
        """target: "host:port". tls: use TLS with the system roots, or root_certificates
        (PEM bytes or a file) for a private CA. timeout: default deadline per call, seconds."""
        self.target = target
        self.timeout = timeout
        self._metadata = _metadata(api_key)
        self._credentials = _credentials(tls, root_certificates)
        self._options = list(options)

    def _timeout(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout


class Client(_Base):
    """Blocking client; thread-safe (one channel, calls from any thread)."""

    def __init__(self, target: str, **kwargs):
        super().__init__(target, **kwargs)
        if self._credentials is None:
            self.channel = grpc.insecure_channel(target, options=self._options)
        else:
            self.channel = grpc.secure_channel(target, self._credentials, options=self._options)
        self.stub = pb_grpc.GenerationServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def generate(self, prompt: Prompt, params: SamplingParams | None = None, *, request_id: str = "",
                 timeout: float | None = None, lora_name: str = "") -> RequestOutput:
        """The whole completion(s), like one element of `LLM.generate`; lora_name: a served LoRA
        adapter (empty: the base model)."""
        response = self.stub.Generate(request_to_proto(prompt, params, request_id, lora_name),
                                      timeout=self._timeout(timeout), metadata=self._metadata)
        return response_from_proto(response, prompt if isinstance(prompt, str) else None)

    def generate_stream(self, prompt: Prompt, params: SamplingParams | None = None, *, request_id: str = "",
                        timeout: float | None = None, lora_name: str = "") -> Iterator[RequestOutput]:
        """RequestOutput deltas as they come (accumulate with jaxserve.outputs.merge_delta)."""
        call = self.stub.GenerateStream(request_to_proto(prompt, params, request_id, lora_name),
                                        timeout=self._timeout(timeout), metadata=self._metadata)
        prompt_ids: list[int] = []
        try:
            for msg in call:
                prompt_ids = prompt_ids or list(msg.prompt_token_ids)
                yield stream_delta_from_proto(msg, prompt_ids)
        finally:
            call.cancel()  # a no-op once the stream ended; aborts the request when left early

    def tokenize(self, text: str, add_special_tokens: bool = True, timeout: float | None = None) -> list[int]:
        response = self.stub.Tokenize(pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens),
                                      timeout=self._timeout(timeout), metadata=self._metadata)
        return list(response.token_ids)

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self._timeout(timeout),
                                      metadata=self._metadata)

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """"SERVING", "NOT_SERVING", ... of the standard grpc.health.v1 service."""
        return _health_status(self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout))

    def wait_until_serving(self, timeout: float = 300.0) -> None:
        """Polls health until SERVING; raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health(timeout=2.0) == "SERVING":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.target} is not SERVING after {timeout} s")
            time.sleep(0.2)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client (grpc.aio); create and use it inside one event loop."""

    def __init__(self, target: str, **kwargs):
        super().__init__(target, **kwargs)
        if self._credentials is None:
            self.channel = grpc.aio.insecure_channel(target, options=self._options)
        else:
            self.channel = grpc.aio.secure_channel(target, self._credentials, options=self._options)
        self.stub = pb_grpc.GenerationServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None, *, request_id: str = "",
                       timeout: float | None = None, lora_name: str = "") -> RequestOutput:
        response = await self.stub.Generate(request_to_proto(prompt, params, request_id, lora_name),
                                            timeout=self._timeout(timeout), metadata=self._metadata)
        return response_from_proto(response, prompt if isinstance(prompt, str) else None)

    async def generate_stream(self, prompt: Prompt, params: SamplingParams | None = None, *, request_id: str = "",
                              timeout: float | None = None, lora_name: str = "") -> AsyncIterator[RequestOutput]:
        call = self.stub.GenerateStream(request_to_proto(prompt, params, request_id, lora_name),
                                        timeout=self._timeout(timeout), metadata=self._metadata)
        prompt_ids: list[int] = []
        try:
            async for msg in call:
                prompt_ids = prompt_ids or list(msg.prompt_token_ids)
                yield stream_delta_from_proto(msg, prompt_ids)
        finally:
            call.cancel()

    async def tokenize(self, text: str, add_special_tokens: bool = True, timeout: float | None = None) -> list[int]:
        response = await self.stub.Tokenize(pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens),
                                            timeout=self._timeout(timeout), metadata=self._metadata)
        return list(response.token_ids)

    async def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self._timeout(timeout),
                                            metadata=self._metadata)

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        response = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return _health_status(response)

    async def wait_until_serving(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if await self.health(timeout=2.0) == "SERVING":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.target} is not SERVING after {timeout} s")
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
