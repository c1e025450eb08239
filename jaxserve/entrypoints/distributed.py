"""Multi-host (multi-process) start-up: `jax.distributed.initialize` from flags or environment.

Every process of a slice runs the same jaxserve command. Each builds the same engine over the
global mesh (all devices of all processes), receives the same requests in the same order,
and runs the same deterministic scheduler, so every process calls the jitted step with
identical inputs, as multi-controller JAX requires. Only process 0 serves gRPC/HTTP and
forwards what it receives to the others (jaxserve.engine.async_llm); offline `LLM.generate` simply
runs the same call on every process.

When a process dies or hangs: the others notice at their next command broadcast
(jaxserve.engine.async_llm._bounded_broadcast). A dead peer's closed connections fail the
collective at once; a hung one (or a host gone without closing its connections) fails it after
JAXSERVE_COLLECTIVE_TIMEOUT_S (60 s). Either way the engine dies under the usual contract
(EngineDeadError for every request, health NOT_SERVING, `jaxserve serve` exits 3). Behind
that, JAX's coordination service declares a task dead after JAXSERVE_HEARTBEAT_TIMEOUT_S
(`heartbeat_timeout_seconds`; unset: JAX's default, 100 s) without heartbeats and then
terminates every other process of the run (SIGABRT, not status 3): the backstop for a
process stuck outside a broadcast. A process that exits normally waits at most
JAXSERVE_SHUTDOWN_TIMEOUT_S (`shutdown_timeout_seconds`; JAX's default 300 s) for the others in
jax.distributed's exit barrier; once its engine died, `jaxserve serve` does not wait that
long: its os._exit(3) backstop (jaxserve.entrypoints.server) ends it within 5 s.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins the multi-process run when one is asked for (flags, or JAX_COORDINATOR_ADDRESS /
    JAX_NUM_PROCESSES / JAX_PROCESS_ID, or a TPU pod's own metadata via JAXSERVE_MULTIHOST=1).
    Returns True when this is a multi-process run. Must run before any other JAX call."""
    import jax

    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator_address is None and os.environ.get("JAXSERVE_MULTIHOST") != "1":
        return False
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, **_timeouts(jax.distributed.initialize))
    log.info("multi-process run: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1



TIMEOUT_ENV = {"JAXSERVE_HEARTBEAT_TIMEOUT_S": "heartbeat_timeout_seconds",
               "JAXSERVE_SHUTDOWN_TIMEOUT_S": "shutdown_timeout_seconds",
               "JAXSERVE_INITIALIZATION_TIMEOUT_S": "initialization_timeout"}


def _timeouts(initialize) -> dict[str, int]:
    """The jax.distributed.initialize timeouts set in the environment (whole seconds > 0),
    those this JAX version takes; a bad value is a ValueError naming the variable."""
    import inspect

    accepted = inspect.signature(initialize).parameters
    out = {}
    for env, arg in TIMEOUT_ENV.items():
        raw = os.environ.get(env, "").strip()
        if not raw:
            continue
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value <= 0:
            raise ValueError(f"{env} must be a whole number of seconds > 0, got {raw!r}")
        if arg in accepted:
            out[arg] = value
        else:
            log.warning("%s is set but this JAX's jax.distributed.initialize has no %s; ignored", env, arg)
    return out