"""One access-log line per gRPC call, and refusals counted by reason.

AccessInterceptor is the outermost server interceptor: it wraps every generation-service
handler (health and reflection are left alone: probes poll them). When the call ends it
reads the status the handler set (context.code()):

    INVALID_ARGUMENT -> invalid_request    UNAUTHENTICATED -> unauthorized
    RESOURCE_EXHAUSTED -> rate_limited     UNAVAILABLE -> unavailable    NOT_FOUND -> not_found

counts it in engine.metrics.rejected{reason=...} (the same counter as HTTP's), and logs
"grpc /jaxserve.v1.GenerationService/Generate OK prompt_tokens=5 output_tokens=8 0.210s id=..."
on the `jaxserve.access` logger unless disabled (--disable-log-requests).
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any, Callable

import grpc

log = logging.getLogger("jaxserve.access")
QUIET_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
REASONS = {grpc.StatusCode.INVALID_ARGUMENT: "invalid_request", grpc.StatusCode.UNAUTHENTICATED: "unauthorized",
           grpc.StatusCode.RESOURCE_EXHAUSTED: "rate_limited", grpc.StatusCode.UNAVAILABLE: "unavailable",
           grpc.StatusCode.NOT_FOUND: "not_found", grpc.StatusCode.PERMISSION_DENIED: "forbidden"}


class _Call:
    def __init__(self, method: str, request: Any):
        self.method, self.start = method, time.monotonic()
        self.request_id = getattr(request, "request_id", "") or "-"
        self.prompt_tokens = self.output_tokens = 0

    def saw(self, response: Any) -> None:
        usage = getattr(response, "usage", None)
        if usage is not None and (usage.prompt_tokens or usage.completion_tokens):
            self.prompt_tokens, self.output_tokens = usage.prompt_tokens, usage.completion_tokens
        rid = getattr(response, "request_id", "")
        if rid and self.request_id == "-":
            self.request_id = rid


class AccessInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, engine_of: Callable[[], Any], enabled: bool = True):
        self._engine_of, self.enabled = engine_of, enabled  # the engine may not exist yet (starting)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method or ""
        if handler is None or method.startswith(QUIET_PREFIXES):
            return handler
        io = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(method, handler.unary_unary), **io)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._stream(method, handler.unary_stream), **io)
        return handler  # no client-streaming methods are served

    def _unary(self, method: str, behavior):
        async def wrapped(request, context):
            call = _Call(method, request)
            try:
                response = await behavior(request, context)
                call.saw(response)
                return response
            finally:
                self._finish(call, context)
        return wrapped

    def _stream(self, method: str, behavior):
        async def wrapped(request, context):
            call = _Call(method, request)
            try:
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for response in result:
                        call.saw(response)
                        yield response
                else:  # a coroutine handler (the API-key refusal)
                    await result
            finally:
                self._finish(call, context)
        return wrapped

    def _finish(self, call: _Call, context: grpc.aio.ServicerContext) -> None:
        code = context.code()
        if isinstance(code, int):  # some grpc versions keep the raw integer
            code = next((c for c in grpc.StatusCode if c.value[0] == code), None)
        code = code or grpc.StatusCode.OK
        reason = REASONS.get(code)
        engine = self._engine_of()
        metrics = getattr(engine, "metrics", None)
        if reason is not None and metrics is not None and hasattr(metrics, "rejected"):
            metrics.rejected.labels(reason=reason, model_name=metrics.model_name).inc()
        if self.enabled:
            log.info("grpc %s %s prompt_tokens=%d output_tokens=%d %.3fs id=%s", call.method, code.name,
                     call.prompt_tokens, call.output_tokens, time.monotonic() - call.start, call.request_id)
