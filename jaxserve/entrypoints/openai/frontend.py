"""HttpFrontend: uvicorn inside the caller's asyncio loop (next to gRPC in `jaxserve serve`).

    await frontend.start()     binds (port 0: any free port, read back from .port), serves
    ...                        uvicorn's tick loop runs as a task; no signal handlers are
                               installed (the serving process owns SIGINT / SIGTERM)
    await frontend.stop(grace) draining: new requests get 503; in-flight ones get `grace`
                               seconds to finish, then their engine requests are aborted
                               (streams end with finish_reason "abort"); then uvicorn stops
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import uvicorn

from jaxserve.entrypoints.openai.app import build_app
from jaxserve.entrypoints.openai.serving_engine import ServingState

log = logging.getLogger(__name__)
POLL_S = 0.05
ABORT_WAIT_S = 2.0  # after aborting at the end of grace, how long responses get to end


class HttpFrontend:
    def __init__(self, engine: Any, *, host: str = "127.0.0.1", port: int = 8000, **build_app_kwargs: Any):
        build_app_kwargs.setdefault("served_model_name", getattr(engine, "model_name", "jaxserve"))
        self.engine, self.host, self.port = engine, host, port
        self.app = build_app(engine, **build_app_kwargs)
        self.state: ServingState = self.app.state.jaxserve
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None

    @property
    def draining(self) -> bool:
        return self.state.draining

    def start_draining(self) -> None:
        """From now on every request but /metrics gets 503 (and /health reports 503)."""
        self.state.draining = True

    async def start(self) -> None:
        config = uvicorn.Config(self.app, host=self.host, port=self.port, lifespan="off", log_level="warning",
                                access_log=False, timeout_graceful_shutdown=ABORT_WAIT_S)
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)  # what Server.serve() would set up
        try:
            await server.startup()
        except SystemExit:  # uvicorn exits on a bind failure; the caller wants an exception
            raise OSError(f"the HTTP front end could not bind {self.host}:{self.port}") from None
        self._server = server
        self.port = server.servers[0].sockets[0].getsockname()[1]
        self._task = asyncio.create_task(server.main_loop(), name="jaxserve-http")
        log.info("OpenAI-compatible HTTP API on http://%s:%d/v1", self.host, self.port)

    async def stop(self, grace: float = 10.0) -> None:
        """Drains, then stops serving (see the module doc)."""
        if self._server is None:
            return
        self.start_draining()
        deadline = time.monotonic() + grace
        while self.state.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        if self.state.in_flight:
            log.warning("%d HTTP requests still running after %.1fs; aborting them", self.state.in_flight, grace)
            for rid in list(self.state.request_ids):
                self.engine.abort(rid)
            deadline = time.monotonic() + ABORT_WAIT_S
            while self.state.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(POLL_S)
        server, self._server = self._server, None
        server.should_exit = True
        if self._task is not None:
            await self._task
        await server.shutdown()
        if self.state.executor is not None:
            self.state.executor.shutdown(wait=False, cancel_futures=True)
