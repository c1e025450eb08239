"""Health probes of the HTTP front end, and the app that answers while the model loads.

    GET /health, GET /ready   200 {"status": "ok"} when serving; otherwise 503 with
                              {"status": "starting"}  ports open, model loading / warm-up
                              {"status": "draining"}  SIGTERM: refusing new work until exit
                              {"status": "engine not running"}  the engine died
    GET /live                 200 {"status": "alive"} while the process can serve at all
                              (starting and draining included); 503 once the engine died

/ready is what a Kubernetes readinessProbe or a load balancer should poll, /live a
livenessProbe (restart only when the engine is dead). `jaxserve serve` binds its ports before
loading the model: until the real app is attached, StartingApp answers the probes and refuses
everything else with 503 `server_starting`.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

PROBE_PATHS = frozenset({"/health", "/ready", "/live"})


def probe_response(path: str, status: str) -> JSONResponse:
    """The answer of a probe path when the server is in `status` (ok | starting | draining |
    engine not running)."""
    if path == "/live":
        dead = status == "engine not running"
        return JSONResponse({"status": status if dead else "alive"}, status_code=503 if dead else 200)
    return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)


class StartingApp:
    """Answers while the model loads: probes say starting (or draining), the rest is a 503."""

    def __init__(self):
        self.status = "starting"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1013})
            return
        path = scope["path"].rstrip("/") or "/"
        if path in PROBE_PATHS:
            response = probe_response(path, self.status)
        else:
            message = ("the server is starting: the model is loading and compiling; retry when /ready answers 200"
                       if self.status == "starting" else "the server is shutting down")
            code = "server_starting" if self.status == "starting" else "draining"
            response = JSONResponse({"error": {"message": message, "type": "server_error", "param": None,
                                               "code": code}}, status_code=503, headers={"retry-after": "5"})
        await response(scope, receive, send)


class Switch:
    """The ASGI app uvicorn serves: StartingApp until `target` is set to the real app."""

    def __init__(self, starting: StartingApp):
        self.starting = starting
        self.target: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await (self.target or self.starting)(scope, receive, send)
