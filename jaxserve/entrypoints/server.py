"""The serving process: one AsyncLLM, any number of front ends (gRPC, HTTP) over it.

    serve(config, [grpc_frontend(...), ...])
      frontend.start()        each binds its port at once, without an engine: gRPC health
                              NOT_SERVING, HTTP /health and /ready 503 {"status": "starting"},
                              /live 200; generation calls get UNAVAILABLE / 503
      AsyncLLM(config)        in a worker thread (the ports keep answering): load the model,
                              compile every bucket (LLMEngine warm-up)
      frontend.attach(engine) calls reach the engine; health still NOT_SERVING / "starting"
      warm_up(engine)         one short request end to end (tokenizer, step, detokenizer)
      frontend.set_serving()  health says SERVING / 200 {"status": "ok"}
      ... SIGTERM / SIGINT ...
      frontend.drain(grace)   all at once: health NOT_SERVING / 503 "draining", new calls
                              refused, calls in flight get `grace` seconds, then are cancelled
      engine.shutdown()
      frontend.close()        the ports close only now, so probes are answered until the
                              process exits with status 0

A SIGTERM while the model loads is honoured once the load returns (health says draining
meanwhile); a load that fails closes the ports and raises (the CLI's exit status 2).

If the engine dies (a step fails: an error no request can be blamed for; see
jaxserve.engine.async_llm), the process stops on its own so that a supervisor restarts it:

      engine dies             every in-flight call gets EngineDeadError (HTTP 503 engine_dead,
                              gRPC INTERNAL), health turns NOT_SERVING / 503 at once
      <= HEALTH_POLL_S        run() notices (it watches `engine.healthy`)
      frontend.stop(2 s)      answers still being written get ENGINE_DEAD_GRACE_S
      exit status 3           EXIT_ENGINE_DEAD, at most ENGINE_DEAD_EXIT_S (5 s) after the
                              engine died: serve() arms a hard os._exit(3) backstop then, in
                              case anything in the teardown hangs

The same holds when the engine dies during warm-up (exit 3, nothing ever SERVING).

A front end is anything with the three coroutines of `Frontend`; it receives the shared
AsyncLLM from its factory, so adding one is a single entry in the list given to `serve`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from typing import Callable, Protocol, Sequence

from jaxserve.engine.async_llm import AsyncLLM, EngineDeadError
from jaxserve.config import EngineConfig
from jaxserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 30.0
EXIT_ENGINE_DEAD = 3  # the process's exit status when the engine died
ENGINE_DEAD_EXIT_S = 5.0  # the process exits at most this long after the engine died
ENGINE_DEAD_GRACE_S = 2.0  # in-flight answers (the error) get this long to be written
HEALTH_POLL_S = 0.1


class Frontend(Protocol):
    """A front end over the shared AsyncLLM. It may also have `async set_serving(bool)`
    (called with True after warm-up: report ready on its health endpoint), a `name` and an
    `address` (for the log)."""

    async def start(self) -> None:
        """Binds and starts accepting calls; not yet reporting ready."""

    async def stop(self, grace: float) -> None:
        """Refuses new calls, lets calls in flight finish within `grace` seconds, closes."""


FrontendFactory = Callable[[AsyncLLM], Frontend]


def grpc_frontend(**options) -> FrontendFactory:
    """A factory for the gRPC front end; options are GrpcOptions fields (host, port, api_key, ...)."""
    from jaxserve.entrypoints.grpc.server import GrpcFrontend, GrpcOptions

    grpc_options = GrpcOptions(**options)  # validated now, before the model loads
    return lambda engine: GrpcFrontend(engine, grpc_options)


def http_frontend(*, host: str, port: int, **options) -> FrontendFactory:
    """A factory for the OpenAI-compatible HTTP front end; options are build_app's keywords
    (served_model_name, api_key, max_concurrent, chat_template, tool_parser)."""
    from jaxserve.entrypoints.openai import HttpFrontend
    from jaxserve.entrypoints.openai.app import check_app_options

    check_app_options(**options)  # validated now, before the model loads
    return lambda engine: HttpFrontend(engine, host=host, port=port, **options)


async def warm_up(engine: AsyncLLM) -> None:
    """Runs one short greedy request through the whole path; raises if the engine fails. Its
    metrics go to a scratch EngineMetrics: /metrics counts only what clients asked for."""
    from jaxserve.engine.metrics import EngineMetrics

    before = engine.stats()["compile_count"]
    served, engine.metrics = engine.metrics, EngineMetrics(engine.model_name)
    try:
        async for _ in engine.generate("warm-up", SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                                       "jaxserve-warm-up"):
            pass
    finally:
        engine.metrics = served
        served.rebase(engine.stats())
        served.refresh(engine.stats())
    after = engine.stats()["compile_count"]
    if after != before:  # the engine's warm-up should have compiled every shape already
        log.warning("the warm-up request compiled %d new programs", after - before)
    log.info("warm-up done: %d compiled programs", after)


async def run(engine: AsyncLLM, frontends: Sequence[Frontend], *, grace: float = DEFAULT_GRACE_S,
              stop: asyncio.Event | None = None, handle_signals: bool = True,
              on_engine_dead: Callable[[], None] | None = None,
              before_close: Callable[[], None] | None = None) -> int:
    """Serves until `stop` is set (or SIGTERM / SIGINT arrives), then drains; returns 0.
    If the engine dies first (or during warm-up): calls `on_engine_dead`, reports NOT_SERVING,
    stops the front ends within ENGINE_DEAD_GRACE_S and returns EXIT_ENGINE_DEAD.
    Front ends already started are not started again; those with drain() / close() are drained,
    then `before_close` runs (in a thread: the engine's shutdown), then they are closed."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if handle_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _on_signal, sig, stop)
    started: list[Frontend] = []
    status = 0
    try:
        for frontend in frontends:
            if not getattr(frontend, "started", False):
                await frontend.start()
            started.append(frontend)
        try:
            if not stop.is_set():
                await warm_up(engine)
        except EngineDeadError:
            if engine.healthy:
                raise
        if engine.healthy and not stop.is_set():
            for frontend in frontends:
                if hasattr(frontend, "set_serving"):
                    await frontend.set_serving(True)
            log.info("SERVING %s on %s", engine.model_name, ", ".join(map(_describe, frontends)))
            await _until_stopped_or_dead(engine, stop)
        if not engine.healthy and not stop.is_set():
            status = EXIT_ENGINE_DEAD
            log.critical("the engine died: stopping within %.0f s with exit status %d so that a supervisor "
                         "restarts the server", ENGINE_DEAD_EXIT_S, EXIT_ENGINE_DEAD)
            if on_engine_dead is not None:
                on_engine_dead()
            grace = min(grace, ENGINE_DEAD_GRACE_S)
            for frontend in started:
                if hasattr(frontend, "set_serving"):
                    await frontend.set_serving(False)
        else:
            log.info("draining: %d requests in flight, grace period %.0f s", engine.num_in_flight, grace)
    finally:
        await asyncio.gather(*(_drain(f, grace) for f in started))
        if before_close is not None:
            await asyncio.to_thread(before_close)
        log.info("closing the ports")
        await asyncio.gather(*(f.close() for f in started if hasattr(f, "drain") and hasattr(f, "close")))
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    log.info("stopped" if status == 0 else f"stopped: exit status {status} (the engine died)")
    return status


async def _drain(frontend: Frontend, grace: float) -> None:
    if hasattr(frontend, "drain") and hasattr(frontend, "close"):
        await frontend.drain(grace)
    else:
        await frontend.stop(grace)


async def _until_stopped_or_dead(engine: AsyncLLM, stop: asyncio.Event) -> None:
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while engine.healthy and not stopped.done():
            await asyncio.wait({stopped}, timeout=HEALTH_POLL_S)
    finally:
        stopped.cancel()


def _describe(frontend: Frontend) -> str:
    name = getattr(frontend, "name", type(frontend).__name__)
    address = getattr(frontend, "address", None)
    if address is None and hasattr(frontend, "port"):
        address = f"{getattr(frontend, 'host', '')}:{frontend.port}"
    return f"{name} {address}" if address else name


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    log.info("received %s", sig.name)
    stop.set()


def serve(config: EngineConfig, frontends: Sequence[FrontendFactory], *, grace: float = DEFAULT_GRACE_S,
          model_name: str | None = None, lora_modules: dict[str, str] | None = None) -> int:
    """Binds every front end, builds the engine, serves until SIGTERM / SIGINT, drains, returns 0
    (EXIT_ENGINE_DEAD if the engine died; see the module docstring).
    In a multi-host run only process 0 serves; the others follow its engine commands until
    it shuts down (jaxserve.entrypoints.distributed). lora_modules: adapter name -> path, loaded
    before serving (jaxserve.entrypoints.lora_modules)."""
    if not frontends:
        raise ValueError("frontends must name at least one front end")
    import jax

    if jax.process_index() != 0:
        return _follow(config, model_name)
    return asyncio.run(_serve_leader(config, frontends, grace, model_name, lora_modules or {}))


async def _serve_leader(config: EngineConfig, factories: Sequence[FrontendFactory], grace: float,
                        model_name: str | None, lora_modules: dict[str, str] | None = None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    frontends = [make(None) for make in factories]  # no engine yet: they answer "starting"
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_early_signal, sig, stop, frontends)
    engine: AsyncLLM | None = None
    started: list[Frontend] = []
    try:
        for frontend in frontends:
            await frontend.start()
            started.append(frontend)
        log.info("listening on %s; loading the model (health: starting)", ", ".join(map(_describe, frontends)))
        engine = await asyncio.to_thread(AsyncLLM, config, model_name=model_name)
        if lora_modules:
            from jaxserve.entrypoints.lora_modules import preload

            await preload(engine, lora_modules)
        for frontend in frontends:
            frontend.attach(engine)
        return await run(engine, frontends, grace=grace, stop=stop, handle_signals=False,
                         on_engine_dead=_arm_exit_backstop, before_close=engine.shutdown)
    finally:
        if engine is None:  # the load failed (or was interrupted): close the ports, then raise
            await asyncio.gather(*(f.stop(0) for f in started))
        else:
            engine.shutdown()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _on_early_signal(sig: signal.Signals, stop: asyncio.Event, frontends: Sequence[Frontend]) -> None:
    """SIGTERM / SIGINT: the probes say draining at once (even while the model loads)."""
    _on_signal(sig, stop)
    for frontend in frontends:
        if hasattr(frontend, "start_draining"):
            frontend.start_draining()
        admission = getattr(frontend, "admission", None)
        if admission is not None:
            admission.draining = True


def _follow(config: EngineConfig, model_name: str | None) -> int:
    """A multi-host follower: runs the engine for process 0, which serves; no ports."""
    engine = AsyncLLM(config, model_name=model_name)
    try:
        log.info("multi-host follower: running the engine for process 0, which serves")
        engine.wait()
        if engine.error is not None:  # its engine died (a step failed, or the leader is gone)
            log.critical("multi-host follower: the engine died (%s); exiting with status %d",
                         engine.error, EXIT_ENGINE_DEAD)
            _arm_exit_backstop()
            return EXIT_ENGINE_DEAD
        return 0
    finally:
        engine.shutdown()


def _arm_exit_backstop() -> None:
    """From the moment the engine's death is noticed, the process ends within
    ENGINE_DEAD_EXIT_S even if a front end or the interpreter's teardown hangs."""
    def hard_exit() -> None:
        log.critical("teardown did not finish in %.0f s: exiting now with status %d",
                     ENGINE_DEAD_EXIT_S, EXIT_ENGINE_DEAD)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(EXIT_ENGINE_DEAD)

    timer = threading.Timer(ENGINE_DEAD_EXIT_S - HEALTH_POLL_S, hard_exit)
    timer.daemon = True
    timer.start()
