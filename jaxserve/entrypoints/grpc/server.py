"""The gRPC front end: one `grpc.aio` server over one AsyncLLM.

Services on one port:

    jaxserve.v1.GenerationService   Generate, GenerateStream, Tokenize, GetModelInfo
    jetstream_proto.Orchestrator    JetStream's Decode / HealthCheck (jetstream_service.py)
    grpc.health.v1.Health           "" and each service above: NOT_SERVING until warm-up is
                                    done, while draining and once the engine died
    grpc.reflection.v1alpha         server reflection (grpcurl list / describe)

A call's life: ApiKeyInterceptor (when an API key is set; it decides from the metadata, before
the request's bytes are parsed) -> the guarded deserializer (bytes that do not parse:
INVALID_ARGUMENT "malformed request: ...") -> servicer parses the request
(INVALID_ARGUMENT naming the field) -> Admission (RESOURCE_EXHAUSTED over the cap,
UNAVAILABLE while draining) -> AsyncLLM.generate, whose deltas go out as they come. If the
client cancels or the deadline expires, grpc.aio cancels the handler; the cancellation runs
AsyncLLM.generate's cleanup, which aborts the request before the engine's next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from jaxserve.engine.async_llm import AsyncLLM, EngineDeadError
from jaxserve.entrypoints.grpc.access_log import AccessInterceptor
from jaxserve.entrypoints.grpc.common import (STARTING_MESSAGE, Admission, ApiKeyInterceptor, EngineCaller,
                                              add_guarded_servicer, parse_or_abort)
from jaxserve.entrypoints.grpc.convert import (UsageCounter, completion_to_proto, prompt_logprobs_to_proto,
                                              request_from_proto)
from jaxserve.entrypoints.grpc.jetstream_service import SERVICE_NAME as JETSTREAM_SERVICE
from jaxserve.entrypoints.grpc.jetstream_service import OrchestratorServicer
from jaxserve.outputs import merge_delta
from jaxserve.entrypoints.lora_modules import lora_modules
from jaxserve.protos import jetstream_pb2_grpc
from jaxserve.protos.v1 import generate_pb2 as pb
from jaxserve.protos.v1 import generate_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(self, caller: EngineCaller):
        self.caller = caller
        self._model_info: pb.ModelInfo | None = None

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        prompt, params = await parse_or_abort(context, request_from_proto, request)
        lora = await self._lora(request, context)
        acc, usage = None, UsageCounter()
        async for delta in self.caller.generate(context, prompt, params, request.request_id, lora_request=lora):
            usage.add(delta)
            acc = merge_delta(acc, delta)
        return pb.GenerateResponse(request_id=acc.request_id, prompt_token_ids=acc.prompt_token_ids,
                                   completions=[completion_to_proto(c) for c in acc.outputs], usage=usage.to_proto(),
                                   prompt_logprobs=prompt_logprobs_to_proto(acc))

    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        prompt, params = await parse_or_abort(context, request_from_proto, request)
        lora = await self._lora(request, context)
        usage, first = UsageCounter(), True
        async for delta in self.caller.generate(context, prompt, params, request.request_id, lora_request=lora):
            usage.add(delta)
            for i, c in enumerate(delta.outputs):
                last = delta.finished and i == len(delta.outputs) - 1
                msg = pb.GenerateStreamResponse(request_id=delta.request_id, delta=completion_to_proto(c),
                                                finished=last)
                if first:
                    msg.prompt_token_ids.extend(delta.prompt_token_ids)
                    msg.prompt_logprobs.extend(prompt_logprobs_to_proto(delta))
                    first = False
                if last:
                    msg.usage.CopyFrom(usage.to_proto())
                yield msg

    async def _lora(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        """The request's LoRA adapter (GenerateRequest.lora_name), None for the base model;
        an unknown name is NOT_FOUND naming it."""
        if not request.lora_name:
            return None
        lora = lora_modules(self.caller.engine).resolve(request.lora_name) if self.caller.engine is not None else None
        if lora is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"lora_name: the LoRA adapter {request.lora_name!r} "
                                                           "does not exist")
        return lora

    async def LoadLoRAAdapter(self, request: pb.LoadLoRAAdapterRequest,
                              context: grpc.aio.ServicerContext) -> pb.LoRAAdapterResponse:
        engine = await self._engine_or_abort(context)
        try:
            await lora_modules(engine).load(engine, request.lora_name, request.lora_path)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        return pb.LoRAAdapterResponse(message=f"Success: LoRA adapter '{request.lora_name}' added successfully.")

    async def UnloadLoRAAdapter(self, request: pb.UnloadLoRAAdapterRequest,
                                context: grpc.aio.ServicerContext) -> pb.LoRAAdapterResponse:
        engine = await self._engine_or_abort(context)
        try:
            await lora_modules(engine).unload(engine, request.lora_name)
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"lora_name: the LoRA adapter {request.lora_name!r} "
                                                           "cannot be found")
        except ValueError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        return pb.LoRAAdapterResponse(message=f"Success: LoRA adapter '{request.lora_name}' removed successfully.")

    async def _engine_or_abort(self, context: grpc.aio.ServicerContext):
        if self.caller.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, STARTING_MESSAGE)
        return self.caller.engine

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        if self.caller.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, STARTING_MESSAGE)
        tokenizer = self.caller.engine.tokenizer
        add = request.add_special_tokens if request.HasField("add_special_tokens") else True
        ids = await asyncio.to_thread(lambda: list(tokenizer(request.text, add_special_tokens=add)["input_ids"]))
        return pb.TokenizeResponse(token_ids=ids, tokens=tokenizer.convert_ids_to_tokens(ids),
                                   max_model_len=self.caller.engine.max_model_len)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        if self.caller.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, STARTING_MESSAGE)
        if self._model_info is None:
            self._model_info = model_info(self.caller.engine)
        return self._model_info


def model_info(engine: AsyncLLM) -> pb.ModelInfo:
    """The served model and the engine's fixed shapes."""
    import jax

    core = engine.engine
    cfg = core.config
    dtype = np.dtype(core.dtype).name
    return pb.ModelInfo(
        model=engine.model_name, model_path=str(core.model_path), max_model_len=core.max_model_len, dtype=dtype,
        kv_cache_dtype=dtype if cfg.kv_cache_dtype == "auto" else cfg.kv_cache_dtype,
        mesh={"data": cfg.data_parallel_size, "model": cfg.tensor_parallel_size}, platform=jax.devices()[0].platform,
        num_devices=jax.device_count(), token_buckets=cfg.token_buckets, seq_buckets=cfg.seq_buckets,
        max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens, page_size=cfg.page_size,
        num_pages=core.stats()["num_total_pages"], vocab_size=core.model_config.vocab_size,
        eos_token_ids=sorted(core.eos_token_ids), max_logprobs=cfg.max_logprobs)


@dataclasses.dataclass(frozen=True)
class GrpcOptions:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (read GrpcFrontend.port after start)
    api_key: str | None = None  # None: no authentication
    tls_cert: str | None = None  # PEM files; both or neither
    tls_key: str | None = None
    max_concurrent: int | None = None  # generation calls in flight; None: no cap
    health_poll_s: float = 0.25  # how often the engine's health is checked
    log_requests: bool = True  # one access-log line per call (grpc/access_log.py)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path} is not a file")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {self.max_concurrent}")


class GrpcFrontend:
    """The gRPC server as a serving-process front end (see jaxserve.entrypoints.server.Frontend)."""

    name = "grpc"

    def __init__(self, engine: AsyncLLM | None, options: GrpcOptions | None = None, **overrides: Any):
        """engine None: `jaxserve serve` binds before the model loads; calls get UNAVAILABLE and
        health NOT_SERVING until attach(engine), and SERVING after set_serving(True)."""
        self.engine = engine
        self.options = dataclasses.replace(options or GrpcOptions(), **overrides)
        self.admission = Admission(self.options.max_concurrent)
        self.admission.starting = engine is None
        self._caller: EngineCaller | None = None
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._watcher: asyncio.Task | None = None
        self._services = ("", GENERATION_SERVICE, JETSTREAM_SERVICE)

    @property
    def address(self) -> str:
        return f"{self.options.host}:{self.port}"

    async def start(self) -> None:
        """Binds and serves; health says NOT_SERVING until set_serving(True)."""
        opts = self.options
        interceptors = [AccessInterceptor(lambda: self.engine, opts.log_requests)]  # outermost: sees every status
        interceptors += [ApiKeyInterceptor(opts.api_key)] if opts.api_key else []
        server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
        caller = self._caller = EngineCaller(self.engine, self.admission, self._on_engine_dead)
        # Every service's deserializers are guarded: malformed bytes get INVALID_ARGUMENT, never
        # UNKNOWN with a traceback (health answers without a key, so it is guarded too).
        add_guarded_servicer(pb_grpc.add_GenerationServiceServicer_to_server, GenerationServicer(caller), server)
        add_guarded_servicer(jetstream_pb2_grpc.add_OrchestratorServicer_to_server, OrchestratorServicer(caller),
                             server)
        add_guarded_servicer(health_pb2_grpc.add_HealthServicer_to_server, self.health, server)
        names = (*self._services[1:], health.SERVICE_NAME, reflection.SERVICE_NAME)
        add_guarded_servicer(reflection_pb2_grpc.add_ServerReflectionServicer_to_server,
                             reflection.aio.ReflectionServicer(names), server)
        for service in self._services:
            await self.health.set(service, NOT_SERVING)
        bind = f"{opts.host}:{opts.port}"
        try:
            if opts.tls_cert:
                pair = (Path(opts.tls_key).read_bytes(), Path(opts.tls_cert).read_bytes())
                self.port = server.add_secure_port(bind, grpc.ssl_server_credentials([pair]))
            else:
                self.port = server.add_insecure_port(bind)
        except RuntimeError as e:  # grpc's "Failed to bind"
            raise OSError(f"cannot bind the gRPC server to {bind} (address in use?): {e}") from None
        if not self.port:
            raise OSError(f"cannot bind the gRPC server to {bind}")
        await server.start()
        self._server = server
        self._watcher = asyncio.create_task(self._watch_engine())
        log.info("gRPC listening on %s (%s%s)", self.address, "TLS" if opts.tls_cert else "plaintext",
                 ", API key required" if opts.api_key else "")

    @property
    def started(self) -> bool:
        return self._server is not None

    def attach(self, engine: AsyncLLM) -> None:
        """The engine has loaded (Tokenize and GetModelInfo answer); generation calls are still
        refused and health says NOT_SERVING until set_serving(True), after the warm-up."""
        self.engine = engine
        if self._caller is not None:
            self._caller.engine = engine

    async def set_serving(self, serving: bool) -> None:
        """Reports SERVING (after warm-up) or NOT_SERVING on the health service."""
        self.admission.ready = serving
        if serving:
            self.admission.starting = False
        status = SERVING if serving and self.engine is not None and self.engine.healthy else NOT_SERVING
        for service in self._services:
            await self.health.set(service, status)

    async def stop(self, grace: float) -> None:
        """Drains: health NOT_SERVING and new calls refused at once; calls in flight get up to
        `grace` seconds to finish, then are cancelled (which aborts them in the engine)."""
        if self._server is None:
            return
        deadline = asyncio.get_running_loop().time() + grace
        await self.drain(grace)
        await self.close(max(0.0, deadline - asyncio.get_running_loop().time()))

    async def drain(self, grace: float) -> None:
        """Health NOT_SERVING and new calls refused (UNAVAILABLE) at once; calls in flight get
        up to `grace` seconds. The port stays open: health answers NOT_SERVING until close()."""
        if self._server is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self.admission.draining = True
        self.admission.ready = False
        for service in self._services:  # NOT_SERVING, but still answering (enter_graceful_shutdown
            await self.health.set(service, NOT_SERVING)  # would freeze it; close() does that)
        while self.admission.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.admission.in_flight:
            log.warning("grace period over: cancelling %d gRPC calls", self.admission.in_flight)

    async def close(self, grace: float = 1.0) -> None:
        """Stops the server; calls still running are cancelled (which aborts them in the engine)."""
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        # In-flight generations are done; give the short calls (and health watches) a moment.
        await self._server.stop(min(1.0, max(0.0, grace)))
        if self._watcher is not None:
            self._watcher.cancel()
        self._server = None

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    def _on_engine_dead(self) -> None:
        asyncio.get_running_loop().create_task(self._report_dead())

    async def _report_dead(self) -> None:
        if self.admission.ready:
            log.error("the engine died: health is NOT_SERVING")
            self.admission.ready = False
            for service in self._services:
                await self.health.set(service, NOT_SERVING)

    async def _watch_engine(self) -> None:
        while True:
            await asyncio.sleep(self.options.health_poll_s)
            if self.engine is not None and not self.engine.healthy:
                await self._report_dead()
