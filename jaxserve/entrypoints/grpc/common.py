"""What the gRPC services share: admission (concurrency cap, draining), the engine call with
its error mapping, and the API-key interceptor.

Status codes, the same for every service:

    ValueError from validation      INVALID_ARGUMENT, the message names the field
    more than max_concurrent calls  RESOURCE_EXHAUSTED, at once
    the server is draining          UNAVAILABLE (clients retry on another replica)
    the engine died                 INTERNAL (and health turns NOT_SERVING)
    missing / wrong API key         UNAUTHENTICATED (every RPC but grpc.health.v1), decided
                                    from the metadata before the request's bytes are parsed
    bytes that do not parse         INVALID_ARGUMENT "malformed request: ..." (never UNKNOWN)

Every service is registered through `add_guarded_servicer`: its request deserializers cannot
raise (a parse failure becomes a MalformedRequest, which the handler answers with
INVALID_ARGUMENT before the servicer sees it). Refusals and malformed requests are logged as
one WARNING per kind per REFUSAL_LOG_INTERVAL_S at most, with the count of those suppressed,
and never with a traceback: a client without a key cannot fill the log.
"""

from __future__ import annotations

import contextlib
import hmac
import inspect
import logging
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable

import grpc

from jaxserve.engine.async_llm import AsyncLLM, EngineDeadError, RequestError
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)

HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
REFUSAL_LOG_INTERVAL_S = 10.0


class RateLimitedLog:
    """At most one WARNING per `kind` per `interval_s`; the next one that gets through says
    how many were suppressed since the last. Never logs a traceback."""

    def __init__(self, logger: logging.Logger, interval_s: float = REFUSAL_LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self._log, self.interval_s, self._clock = logger, interval_s, clock
        self._state: dict[str, tuple[float, int]] = {}  # kind -> (time logged, suppressed since)
        self._lock = threading.Lock()

    def warning(self, kind: str, msg: str, *args: Any) -> bool:
        """Logs `msg % args` unless `kind` was logged less than interval_s ago; True if logged."""
        now = self._clock()
        with self._lock:
            last, suppressed = self._state.get(kind, (None, 0))
            if last is not None and now - last < self.interval_s:
                self._state[kind] = (last, suppressed + 1)
                return False
            self._state[kind] = (now, 0)
        if suppressed:
            msg += " (%d more suppressed in the last %.0f s)"
            args = (*args, suppressed, now - last)
        self._log.warning(msg, *args)
        return True


refusals = RateLimitedLog(log)


STARTING_MESSAGE = "the server is starting: the model is loading and compiling; retry when health says SERVING"


class Admission:
    """Counts the generation calls in flight; refuses calls beyond the cap or while draining."""

    def __init__(self, max_concurrent: int | None = None):
        if max_concurrent is not None and max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1 or None, got {max_concurrent}")
        self.max_concurrent = max_concurrent
        self.in_flight = 0
        self.ready = False  # warmed up: health may report SERVING
        self.draining = False  # shutting down: new calls are refused
        self.starting = False  # the model is still loading (no engine yet): calls are refused

    @contextlib.asynccontextmanager
    async def admit(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        if self.starting:
            await context.abort(grpc.StatusCode.UNAVAILABLE, STARTING_MESSAGE)
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
                       params: SamplingParams, request_id: str = "",
                       lora_request=None) -> AsyncIterator[RequestOutput]:
        """Streams the request's deltas. A client cancel or an expired deadline cancels the
        handler; AsyncLLM.generate then aborts the request (its pages are free within a step)."""
        async with self.admission.admit(context):
            if not self.engine.healthy:
                self.on_engine_dead()
                await context.abort(grpc.StatusCode.INTERNAL, "the engine is not running")
            request_id = request_id or uuid.uuid4().hex
            lora = {"lora_request": lora_request} if lora_request is not None else {}
            stream = self.engine.generate(prompt, params, request_id, **lora)
            try:
                async for delta in stream:
                    yield delta
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except EngineDeadError as e:
                self.on_engine_dead()
                await context.abort(grpc.StatusCode.INTERNAL, str(e))
            except RequestError as e:  # this request failed; the engine serves the others
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
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED. It has no
    request deserializer: the bytes of a refused call are never parsed."""
    message = "missing or invalid API key: send metadata 'authorization: Bearer <key>'"

    async def deny(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler is None:
        return grpc.unary_unary_rpc_method_handler(deny)
    io = dict(request_deserializer=None, response_serializer=handler.response_serializer)
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
        # Runs on the call's metadata, before any of its request bytes are read or parsed.
        method = handler_call_details.method or ""
        if method.startswith(HEALTH_METHOD_PREFIX) or _authorized(handler_call_details.invocation_metadata, self._key):
            return await continuation(handler_call_details)
        refusals.warning("unauthenticated", "refused %s: missing or invalid API key", method[:200])
        return _denied(await continuation(handler_call_details))


# -- request bytes that do not parse ---------------------------------------------------

class MalformedRequest:
    """What a guarded deserializer returns for bytes that do not parse as the request type."""

    __slots__ = ("type_name", "reason")

    def __init__(self, type_name: str, reason: str):
        self.type_name, self.reason = type_name, reason

    @property
    def message(self) -> str:
        return f"malformed request: the bytes do not parse as {self.type_name} ({self.reason})"


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if text.startswith("Error parsing message") and "': " in text:
        text = text.split("': ", 1)[1]  # the type is named in the message already
    return text[:160] or type(e).__name__


def safe_deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`deserialize`, except that any exception (DecodeError, bad UTF-8 in a string field, a
    truncated message, a huge length) becomes a MalformedRequest instead of propagating."""
    owner = getattr(deserialize, "__self__", None)  # Message.FromString is a bound classmethod
    descriptor = getattr(owner, "DESCRIPTOR", None)
    type_name = getattr(descriptor, "full_name", None) or getattr(owner, "__name__", "the request type")

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # noqa: BLE001 -- whatever the parser raises, the client sent it
            return MalformedRequest(type_name, _reason(e))

    return parse


async def reject_malformed(context: grpc.aio.ServicerContext, method: str, request: MalformedRequest) -> None:
    refusals.warning("malformed", "malformed %s request from %s: %s", method, context.peer(), request.reason)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


async def _result(value):
    return await value if inspect.isawaitable(value) else value


def guard_handler(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` with a deserializer that cannot raise; a MalformedRequest is answered with
    INVALID_ARGUMENT before the behaviour runs (for request streams: when it is reached)."""
    if handler.request_deserializer is None:
        return handler
    safe = safe_deserializer(handler.request_deserializer)

    if handler.unary_unary:
        behavior = handler.unary_unary

        async def unary_unary(request, context):
            if isinstance(request, MalformedRequest):
                await reject_malformed(context, method, request)
            return await _result(behavior(request, context))

        return handler._replace(request_deserializer=safe, unary_unary=unary_unary)

    async def results(out):
        if hasattr(out, "__aiter__"):
            async for item in out:
                yield item
        elif inspect.isawaitable(out):
            await out  # a behaviour that writes with context.write
        elif out is not None:
            for item in out:
                yield item

    if handler.unary_stream:
        behavior = handler.unary_stream

        async def unary_stream(request, context):
            if isinstance(request, MalformedRequest):
                await reject_malformed(context, method, request)
            async for item in results(behavior(request, context)):
                yield item

        return handler._replace(request_deserializer=safe, unary_stream=unary_stream)

    def checked(requests, context):
        async def gen():
            async for request in requests:
                if isinstance(request, MalformedRequest):
                    await reject_malformed(context, method, request)
                yield request
        return gen()

    if handler.stream_unary:
        behavior = handler.stream_unary

        async def stream_unary(requests, context):
            return await _result(behavior(checked(requests, context), context))

        return handler._replace(request_deserializer=safe, stream_unary=stream_unary)

    behavior = handler.stream_stream

    async def stream_stream(requests, context):
        async for item in results(behavior(checked(requests, context), context)):
            yield item

    return handler._replace(request_deserializer=safe, stream_stream=stream_stream)


class _Registrations:
    """Stands in for the server while a generated `add_*Servicer_to_server` runs: keeps the
    method handlers it registers."""

    def __init__(self):
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.services[service] = dict(handlers)

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass  # built again below from the same method handlers


def add_guarded_servicer(add_to_server: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server) -> None:
    """add_to_server(servicer, server) (a generated `add_*Servicer_to_server`), with every
    method's request deserializer guarded (see guard_handler). Service and method names are
    those of the generated code, so reflection and clients see the same services."""
    capture = _Registrations()
    add_to_server(servicer, capture)
    if not capture.services:
        raise TypeError(f"{add_to_server.__name__} registered no method handlers")
    for service, handlers in capture.services.items():
        guarded = {name: guard_handler(f"/{service}/{name}", h) for name, h in handlers.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, guarded),))
        server.add_registered_method_handlers(service, guarded)
