"""What the gRPC services share: admission (concurrency cap, draining), the engine call with
its error mapping, and the API-key interceptor.

Status codes, the same for every service:

    ValueError from validation      INVALID_ARGUMENT, the message names the field
    more than max_concurrent calls  RESOURCE_EXHAUSTED, at once
    the server is draining          UNAVAILABLE (clients retry on another replica)
    the engine died                 INTERNAL (and health turns NOT_SERVING)
    missing / wrong API key         UNAUTHENTICATED (every RPC but grpc.health.v1)
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import uuid
from typing import AsyncIterator, Callable

import grpc

from jaxserve.engine.async_llm import AsyncLLM, EngineDeadError
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)

HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"


class Admission:
    """Counts the generation calls in flight; refuses calls beyond the cap or while draining."""

    def __init__(self, max_concurrent: int | None = None):
        if max_concurrent is not None and max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1 or None, got {max_concurrent}")
        self.max_concurrent = max_concurrent
        self.in_flight = 0
        self.ready = False  # warmed up: health may report SERVING
        self.draining = False  # shutting down: new calls are refused

    @contextlib.asynccontextmanager
    async def admit(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        if self.max_concurrent is not None and self.in_flight >= self.max_concurrent:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"too many concurrent requests (max_concurrent is {self.max_concurrent})")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


async def parse_or_abort(context: grpc.aio.ServicerContext, parse: Callable, request):
    """parse(request), or INVALID_ARGUMENT with the ValueError's message (it names the field)."""
    try:
        return parse(request)
    except ValueError as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))


class EngineCaller:
    """Runs requests on the AsyncLLM for a servicer and turns engine errors into statuses."""

    def __init__(self, engine: AsyncLLM, admission: Admission, on_engine_dead: Callable[[], None]):
        self.engine = engine
        self.admission = admission
        self.on_engine_dead = on_engine_dead

    async def generate(self, context: grpc.aio.ServicerContext, prompt: str | list[int],
                       params: SamplingParams, request_id: str = "") -> AsyncIterator[RequestOutput]:
        """Streams the request's deltas. A client cancel or an expired deadline cancels the
        handler; AsyncLLM.generate then aborts the request (its pages are free within a step)."""
        async with self.admission.admit(context):
            if not self.engine.healthy:
                self.on_engine_dead()
                await context.abort(grpc.StatusCode.INTERNAL, "the engine is not running")
            request_id = request_id or uuid.uuid4().hex
            stream = self.engine.generate(prompt, params, request_id)
            try:
                async for delta in stream:
                    yield delta
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except EngineDeadError as e:
                self.on_engine_dead()
                await context.abort(grpc.StatusCode.INTERNAL, str(e))
            finally:
                await stream.aclose()  # aborts the request if it did not finish


def _authorized(metadata, api_key: bytes) -> bool:
    for key, value in metadata or ():
        if key == "authorization":
            value = value.encode() if isinstance(value, str) else value
            scheme, _, token = value.partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), api_key)
    return False


def _denied(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""
    message = "missing or invalid API key: send metadata 'authorization: Bearer <key>'"

    async def deny(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(deny)
    io = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny, **io)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **io)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(deny, **io)
    return grpc.unary_unary_rpc_method_handler(deny, **io)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <api_key>` on every RPC except the health service
    (load balancers probe health without credentials). Constant-time comparison."""

    def __init__(self, api_key: str):
        if not api_key:
            raise ValueError("api_key must not be empty")
        self._key = api_key.encode()

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(HEALTH_METHOD_PREFIX) or _authorized(handler_call_details.invocation_metadata, self._key):
            return await continuation(handler_call_details)
        log.info("refused %s: missing or invalid API key", method)
        return _denied(await continuation(handler_call_details))
