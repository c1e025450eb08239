"""Multi-host (multi-process) start-up: `jax.distributed.initialize` from flags or environment.

Every process of a slice runs the same jaxserve command. Each builds the same engine over the
global mesh (all devices of all processes), receives the same requests in the same order,
and runs the same deterministic scheduler, so every process calls the jitted step with
identical inputs, as multi-controller JAX requires. Only process 0 serves gRPC/HTTP and
forwards what it receives to the others (jaxserve.engine.async_llm); offline `LLM.generate` simply
runs the same call on every process.
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
                               process_id=process_id)
    log.info("multi-process run: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1
