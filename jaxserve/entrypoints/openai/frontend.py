"""HttpFrontend: uvicorn inside the caller's asyncio loop (next to gRPC in `jaxserve serve`).

    await frontend.start()     binds (port 0: any free port, read back from .port), serves
    ...                        uvicorn's tick loop runs as a task; no signal handlers are
                               installed (the serving process owns SIGINT / SIGTERM)
    await frontend.stop(grace) drain(grace), then close():
      drain(grace)             draining: new requests get 503, the probes say draining;
                               in-flight ones get `grace` seconds to finish, then their engine
                               requests are aborted (streams end with finish_reason "abort")
      close()                  uvicorn stops (`jaxserve serve` closes after the engine is
                               down, so the probes answer until the process exits)

Built without an engine (`jaxserve serve` binds before the model loads), it answers with
probes.StartingApp until attach(engine); then /health and /ready say "starting" until
set_serving(True) (after warm-up).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import uvicorn

from jaxserve.entrypoints.openai.app import build_app, check_app_options
from jaxserve.entrypoints.openai.probes import StartingApp, Switch
from jaxserve.entrypoints.openai.serving_engine import ServingState

log = logging.getLogger(__name__)
POLL_S = 0.05
ABORT_WAIT_S = 2.0  # after aborting at the end of grace, how long responses get to end


class HttpFrontend:
    name = "http"

    def __init__(self, engine: Any = None, *, host: str = "127.0.0.1", port: int = 8000, **build_app_kwargs: Any):
        check_app_options(**build_app_kwargs)  # bad options fail now, before any model loads
        self.host, self.port = host, port
        self._build_app_kwargs = build_app_kwargs
        self.engine: Any = None
        self.app: Any = None
        self.state: ServingState | None = None
        self._switch = Switch(StartingApp())
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None
        if engine is not None:
            self.attach(engine, ready=True)

    def attach(self, engine: Any, ready: bool = False) -> None:
        """Builds the OpenAI app over `engine` and serves it from now on; until set_serving(True)
        the probes say "starting" (unless `ready`)."""
        kwargs = dict(self._build_app_kwargs)
        kwargs.setdefault("served_model_name", getattr(engine, "model_name", "jaxserve"))
        self.engine = engine
        self.app = build_app(engine, **kwargs)
        self.state = self.app.state.jaxserve
        self.state.ready = ready
        self.state.draining = self._switch.starting.status == "draining"
        self._switch.target = self.app

    async def set_serving(self, serving: bool) -> None:
        if self.state is not None:
            self.state.ready = serving

    @property
    def draining(self) -> bool:
        return self.state.draining if self.state is not None else self._switch.starting.status == "draining"

    def start_draining(self) -> None:
        """From now on every request but /metrics gets 503 (and the probes report draining)."""
        self._switch.starting.status = "draining"
        if self.state is not None:
            self.state.draining = True

    @property
    def started(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        config = uvicorn.Config(self._switch, host=self.host, port=self.port, lifespan="off", log_level="warning",
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
        await self.drain(grace)
        await self.close()

    async def drain(self, grace: float = 10.0) -> None:
        """Refuses new requests; in-flight ones get `grace` seconds, then are aborted."""
        if self._server is None:
            return
        self.start_draining()
        state = self.state
        if state is None:
            return
        deadline = time.monotonic() + grace
        while state.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        if state.in_flight:
            log.warning("%d HTTP requests still running after %.1fs; aborting them", state.in_flight, grace)
            for rid in list(state.request_ids):
                self.engine.abort(rid)
            deadline = time.monotonic() + ABORT_WAIT_S
            while state.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(POLL_S)

    async def close(self) -> None:
        """Stops uvicorn (after drain)."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.should_exit = True
        if self._task is not None:
            await self._task
        await server.shutdown()
        if self.state is not None and self.state.executor is not None:
            self.state.executor.shutdown(wait=False, cancel_futures=True)
