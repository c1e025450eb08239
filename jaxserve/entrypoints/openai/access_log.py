"""One access-log line per HTTP request, and refusals counted by reason.

    AccessLog (the outermost ASGI middleware)
      record = AccessRecord(method, path)     set as CURRENT for the request's task (the
                                              handler's EngineRequests registers itself in it)
      app(scope, receive, send')              send' reads the status of http.response.start
      after the response (a stream: after its last byte):
        status 4xx / 503 -> engine.metrics.rejected{reason=REASONS[status]} += 1
        log "POST /v1/chat/completions 200 prompt_tokens=12 output_tokens=30 0.412s id=chatcmpl-..."
        on the `jaxserve.access` logger (off with --disable-log-requests)

The probes (/health, /ready, /live) and /metrics are neither logged nor counted: an
orchestrator polls them every few seconds. Refusals while the model still loads (before the
engine and its metrics exist) are answered by probes.StartingApp and not counted.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jaxserve.entrypoints.openai.probes import PROBE_PATHS

log = logging.getLogger("jaxserve.access")
QUIET_PATHS = PROBE_PATHS | {"/metrics"}
REASONS = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
           405: "method_not_allowed", 408: "request_timeout", 413: "body_too_large", 415: "unsupported_media_type",
           422: "invalid_request", 429: "rate_limited", 503: "unavailable"}


@dataclasses.dataclass
class AccessRecord:
    method: str
    path: str
    start: float
    status: int = 0
    request_id: str | None = None
    requests: list[Any] = dataclasses.field(default_factory=list)  # EngineRequests of this HTTP request

    def tokens(self) -> tuple[int, int]:
        prompt = sum(sum(r.prompt_tokens.values()) for r in self.requests)
        return prompt, sum(r.output_tokens for r in self.requests)


CURRENT: contextvars.ContextVar[AccessRecord | None] = contextvars.ContextVar("jaxserve_access", default=None)


def register(requests: Any, request_id: str) -> None:
    """Called by EngineRequests: ties it (and its id) to the HTTP request being served."""
    record = CURRENT.get()
    if record is not None:
        record.requests.append(requests)
        record.request_id = record.request_id or request_id


def rejection_reason(status: int) -> str | None:
    if 400 <= status < 500 or status == 503:
        return REASONS.get(status, f"http_{status}")
    return None


class AccessLog:
    def __init__(self, app: ASGIApp, engine: Any, enabled: bool = True):
        self.app, self.engine, self.enabled = app, engine, enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") in QUIET_PATHS:
            await self.app(scope, receive, send)
            return
        record = AccessRecord(scope.get("method", ""), scope["path"], time.monotonic())
        token = CURRENT.set(record)

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            CURRENT.reset(token)
            self._finish(record)

    def _finish(self, record: AccessRecord) -> None:
        status = record.status or 499  # nothing sent: the client went away first (nginx's 499)
        reason = rejection_reason(status)
        if reason is not None:
            metrics = getattr(self.engine, "metrics", None)
            if metrics is not None and hasattr(metrics, "rejected"):
                metrics.rejected.labels(reason=reason, model_name=metrics.model_name).inc()
        if self.enabled:
            prompt, output = record.tokens()
            log.info("%s %s %d prompt_tokens=%d output_tokens=%d %.3fs id=%s", record.method, record.path, status,
                     prompt, output, time.monotonic() - record.start, record.request_id or "-")
