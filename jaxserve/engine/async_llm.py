"""AsyncLLM: the engine behind the servers, driven by ONE background thread.

Where the threads meet:

    caller (any asyncio loop)                     engine thread (owns LLMEngine)
    ------------------------                      ------------------------------
    generate(): put ("add", ...) on commands ---> between steps: engine.add_request
                await the add's Future   <------- result or ValueError (validation)
                await its asyncio.Queue  <------- after each step: RequestOutput deltas,
                                                  via loop.call_soon_threadsafe
    abort() / client cancel: ("abort", id) -----> engine.abort before the next step: the
                                                  pages are free within one step
    shutdown(): ("stop",) ---------------------->  loop ends; in-flight calls get an error

The engine is never touched outside its thread, so it needs no locks.

Failures (the contract; issue 13):

    traced to one request               that request alone fails: its stream raises
      (detokenizing, stop strings,      RequestError (HTTP 500 with a JSON body / gRPC
      logprobs, building its output;    INTERNAL for that call only); its pages are freed;
      an unexpected error in its add)   every other request goes on, `healthy` stays True
    not traced (the device step, the    the engine is dead: every in-flight and later call
      scheduler, anything else in the   gets EngineDeadError, `healthy` turns False (health
      loop raises)                      NOT_SERVING / 503), and `jaxserve serve` exits with
                                        status EXIT_ENGINE_DEAD (3) within
                                        ENGINE_DEAD_EXIT_S (5 s) of the failure, after the
                                        in-flight calls were answered with the error
                                        (jaxserve.entrypoints.server), so that a supervisor
                                        (systemd, Kubernetes) restarts it

A ValueError from validation is neither: the caller's add raises it, nothing else changes.
Faults can be injected for tests with JAXSERVE_FAULTS (jaxserve.engine.faults), read once
when the AsyncLLM starts; unset, the engine runs its own code only.

Multi-host: every process runs an AsyncLLM over the same global-mesh engine. Process 0 (the
only one that serves) broadcasts the commands it applies (adds with their prompt and
SamplingParams, aborts, stop) and the followers apply the same ones before the same step,
so every process runs identical steps (see jaxserve/entrypoints/distributed.py). A
broadcast is one collective of a fixed-size header (a second one only for a large payload)
and happens at sync iterations only, which each broadcast announces: while requests run and
no commands come, syncs thin out to one per MAX_SYNC_INTERVAL steps (or SYNC_LATENCY_S), and
a command waits for the next sync (so there an abort frees its pages within that bound, not
within one step). A broadcast that fails (a peer died: its connections closed) or takes
over JAXSERVE_COLLECTIVE_TIMEOUT_S (a peer hangs) raises CollectiveError on the engine
thread: the engine is dead, under the contract above, instead of hanging in the collective.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import queue
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator

from jaxserve.config import EngineConfig
from jaxserve.engine import faults
from jaxserve.engine.metrics import EngineMetrics
from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.lora_request import LoRARequest
from jaxserve.sampling_params import SamplingParams

if TYPE_CHECKING:  # the engine (JAX, the model code) is imported when one is built: front ends bind first
    from jaxserve.engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)

# Multi-host command broadcast (see AsyncLLM._next_commands): a fixed-size header collective
# (payload length, iterations until the next sync, small payloads inline), and how far apart
# syncs may drift while the leader gets no commands: a command waits at most about
# SYNC_LATENCY_S (and never more than MAX_SYNC_INTERVAL iterations) for the next sync.
HEADER_BYTES = 4096
_FIELDS = 8  # header bytes before the inline payload: uint32 length, uint32 interval
MAX_SYNC_INTERVAL = 16
SYNC_LATENCY_S = 0.02
# The longest one broadcast may take (JAXSERVE_COLLECTIVE_TIMEOUT_S; 0: no bound). Every
# process reaches each sync within about a step of the others (the leader syncs at least
# every 0.5 s while idle), so only a dead or hung process makes one wait this long; then the
# engine dies (EngineDeadError for everyone, `jaxserve serve` exits 3) instead of hanging.
DEFAULT_COLLECTIVE_TIMEOUT_S = 60.0


class CollectiveError(RuntimeError):
    """A multi-host broadcast failed or timed out: a process of the run died or hangs."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped (a step failed, or shutdown); no request can be served."""


class RequestError(RuntimeError):
    """This request failed on its own (an error traced to it); the engine serves on."""


@dataclasses.dataclass
class _Stream:
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    arrival: float
    num_samples: int
    first_token: float | None = None
    last_token: dict[int, float] = dataclasses.field(default_factory=dict)  # per sample index

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncLLM:
    def __init__(self, config: EngineConfig | None = None, *, engine: "LLMEngine | None" = None,
                 model_name: str | None = None):
        if engine is None:
            from jaxserve.engine.data_parallel import make_engine

            engine = make_engine(config or EngineConfig())
        self.engine = engine
        self.model_name = model_name or str(self.engine.config.model or "jaxserve-demo")
        self.metrics = EngineMetrics(self.model_name)
        self.metrics.refresh(self.engine.stats())  # gauges are right before the first step
        faults.install_from_env(self.engine)  # tests only; nothing is wrapped when unset
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._error: BaseException | None = None
        self._stopped = False
        self._idle = threading.Event()
        import jax

        self.multihost = jax.process_count() > 1
        self.is_leader = jax.process_index() == 0
        self._thread = threading.Thread(target=self._loop, name="jaxserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: str | None = None, **overrides: Any) -> "AsyncLLM":
        return cls(EngineConfig.load(config, **overrides))

    # -- what servers read ------------------------------------------------------------

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def healthy(self) -> bool:
        return self._error is None and not self._stopped and self._thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        """What stopped the engine, or None (running, or shut down on purpose)."""
        return self._error

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    # -- requests ---------------------------------------------------------------------

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None, lora_request=None) -> AsyncIterator[RequestOutput]:
        """Streams RequestOutput deltas (new text and token ids of one sample each) until the
        request finishes. Raises ValueError for an invalid request before the first delta.
        Leaving the loop early (break, cancellation, client gone) aborts the request.
        lora_request: a LoRARequest (the engine needs enable_lora), or None: the base model."""
        request_id = request_id or uuid.uuid4().hex
        params = params if params is not None else SamplingParams()
        if params.structured_outputs is not None:
            await self._compile_grammar(params)
        stream = _Stream(asyncio.Queue(), asyncio.get_running_loop(), time.monotonic(), params.n)
        added: concurrent.futures.Future = concurrent.futures.Future()
        self._send(("add", request_id, prompt, params, lora_request, stream, added))
        finished = False
        try:
            await asyncio.wrap_future(added)  # inside the try: a cancel while adding still aborts
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                # Abort only what THIS call added: a refused add (a duplicate request_id, a
                # ValueError) or one dropped while queued owns nothing, and the id may belong
                # to another caller's request. A cancel while the add runs on the engine
                # thread decides when the add does (the callback runs then, or now if done).
                added.add_done_callback(functools.partial(self._abort_if_added, request_id))

    async def beam_search(self, prompt: str | list[int], params: "BeamSearchParams",
                          request_id: str | None = None) -> "BeamSearchOutput":
        """Beam search for one prompt (engine/beam_search.py); its beams run as concurrent requests."""
        from jaxserve.engine.beam_search import beam_search_async

        return await beam_search_async(self, prompt, params, request_id or uuid.uuid4().hex)

    async def _compile_grammar(self, params: SamplingParams) -> None:
        """Waits, off the event loop and off the engine thread, for the request's grammar to
        compile (a cache hit is immediate), so the engine's add finds it compiled. Raises
        ValueError naming the field when it is invalid or exceeds the compile timeout."""
        structured, so = self.engine.structured, params.structured_outputs
        future = asyncio.wrap_future(structured.submit(so))
        try:  # shielded: a timeout must not cancel the compile other requests may share
            await asyncio.wait_for(asyncio.shield(future), structured.compile_timeout_s)
        except asyncio.TimeoutError:
            raise structured.timeout_error(so) from None

    async def add_lora(self, lora_request) -> bool:
        """Reads and checks an adapter on the engine thread (ValueError if it is bad)."""
        return await self._lora_command("lora_add", lora_request)

    async def remove_lora(self, lora_int_id: int) -> bool:
        """Forgets an adapter; False if unknown; ValueError while unfinished requests use it."""
        return await self._lora_command("lora_remove", lora_int_id)

    async def list_loras(self) -> set[int]:
        return await self._lora_command("lora_list", None)

    async def _lora_command(self, kind: str, arg):
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._send((kind, arg, done))
        return await asyncio.wrap_future(done)

    def _lora(self, kind: str, arg, done: concurrent.futures.Future | None) -> None:
        """Engine thread: one adapter command (its errors go back to its caller only)."""
        try:
            if kind == "lora_add":
                result = self.engine.add_lora(arg)
            elif kind == "lora_remove":
                result = self.engine.remove_lora(arg)
            else:
                result = self.engine.list_loras()
        except Exception as e:  # noqa: BLE001 - a bad adapter or a refused unload: the caller's error
            if done is not None:
                done.set_exception(e if isinstance(e, ValueError) else RequestError(f"{type(e).__name__}: {e}"))
            return
        if done is not None:
            done.set_result(result)

    def _abort_if_added(self, request_id: str, added: concurrent.futures.Future) -> None:
        if not added.cancelled() and added.exception() is None:
            self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Aborts a request (thread-safe, non-blocking); its stream ends with finish_reason 'abort'."""
        if not self._stopped:
            self._commands.put(("abort", request_id))

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Waits until the engine thread has no work and sleeps until the next command; only
        then may another thread use the LLMEngine directly (tests that share one engine)."""
        return self._idle.wait(timeout)

    def wait(self) -> None:
        """Blocks until the engine thread ends (a multi-host follower's whole job)."""
        self._thread.join()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the engine thread; in-flight requests end with EngineDeadError."""
        if not self._stopped:
            self._commands.put(("stop",))
            self._thread.join(timeout)

    def _send(self, command: tuple) -> None:
        if self._error is not None or self._stopped:
            raise EngineDeadError(f"the engine is not running: {self._error or 'shut down'}")
        self._commands.put(command)
        if self._stopped:  # the loop ended while we queued: nobody will answer this command
            self._fail_pending(EngineDeadError("the engine shut down"))

    # -- engine thread ----------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                idle = not self.engine.has_unfinished_requests()
                if not self._apply_commands(block=idle):
                    break
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    self._dispatch(outputs)
                    self.metrics.refresh(self.engine.stats())
        except BaseException as e:  # noqa: BLE001 - any failure kills the engine: report it to everyone
            log.exception("engine step failed; the engine is stopped")
            self._error = e
        finally:
            self._stopped = True
            error = EngineDeadError(f"the engine stopped: {self._error!r}" if self._error else "the engine shut down")
            for stream in self._streams.values():
                stream.put(error)
            self._streams.clear()
            self._fail_pending(error)

    def _apply_commands(self, block: bool) -> bool:
        """Runs queued add/abort commands (waiting for one when idle); False on stop."""
        for command in self._next_commands(block):
            if command[0] == "stop":
                return False
            if command[0] == "add":
                self._add(*command[1:])
            elif command[0] == "abort":
                self._abort(command[1])
            elif command[0].startswith("lora_"):
                self._lora(*command)
        return True

    # Multi-host command sync. Process 0 broadcasts its commands only at sync iterations,
    # and each broadcast announces how many iterations pass until the next one; a process
    # that is idle (no unfinished requests; the same on every process, since they all run
    # the same steps) always syncs. So every process knows, without being told, which
    # iterations sync: between two syncs nobody calls a collective, and the leader's new
    # commands wait in its queue until the announced sync. Engine thread only.
    _sync_countdown = 0  # iterations left until the next sync (0: this one syncs)
    _sync_interval = 1  # the interval announced at the last sync
    _sync_time = 0.0  # leader: time.monotonic() at the last sync

    def _next_commands(self, block: bool) -> list[tuple]:
        if self.multihost and not block and self._sync_countdown > 0:
            self._sync_countdown -= 1  # not a sync iteration, on every process alike
            return []
        commands: list[tuple] = []
        while True:
            try:
                if block and not commands and not (self.multihost and not self.is_leader):
                    self._idle.set()  # blocked here, only a command wakes the engine thread
                    command = self._commands.get(timeout=0.5)
                    self._idle.clear()
                else:
                    command = self._commands.get_nowait()
                commands.append(command)
            except queue.Empty:
                if block and not commands and not self.multihost:
                    self.metrics.refresh(self.engine.stats())
                    continue
                break
        # An add whose caller went away while it was queued is dropped here, before any
        # follower hears of it; the rest can no longer be cancelled.
        commands = [c for c in commands if c[0] not in ("add", "lora_add", "lora_remove", "lora_list")
                    or c[-1].set_running_or_notify_cancel()]
        if not self.multihost:
            return commands
        if self.is_leader:
            payload = (json.dumps([_to_wire(c) for c in commands], separators=(",", ":")).encode()
                       if commands else b"")
            interval = self._next_sync_interval(busy=bool(commands) or block)
        else:
            payload, interval = b"", 0
        payload, self._sync_interval = _broadcast_bytes(payload, interval)
        self._sync_countdown = self._sync_interval - 1
        if self.is_leader:
            return commands
        return [_from_wire(w) for w in json.loads(payload)] if payload else []

    def _next_sync_interval(self, busy: bool) -> int:
        """Leader: iterations until the sync after this one. 1 while commands flow (or right
        after idling: requests come in bursts); else doubling, up to MAX_SYNC_INTERVAL and to
        what fits SYNC_LATENCY_S at the step time measured since the last sync."""
        now = time.monotonic()
        last, self._sync_time = self._sync_time, now
        if busy:
            return 1
        per_iteration = (now - last) / self._sync_interval
        fits = int(SYNC_LATENCY_S / per_iteration) if per_iteration > 0 else MAX_SYNC_INTERVAL
        return max(1, min(2 * self._sync_interval, MAX_SYNC_INTERVAL, fits))

    def _add(self, request_id, prompt, params, lora_request, stream: _Stream | None,
             added: concurrent.futures.Future | None) -> None:
        try:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            lora = {"lora_request": lora_request} if lora_request is not None else {}
            prompt_ids = self.engine.add_request(request_id, prompt, params, **lora)
        except Exception as e:  # noqa: BLE001 - errors of one add go back to its caller only
            if not isinstance(e, ValueError):  # not validation: a failure traced to this request
                log.exception("adding request %r failed", request_id)
                try:
                    self.engine.abort(request_id)  # whatever part of it got in (the id was free)
                except Exception:  # noqa: BLE001
                    log.exception("cleaning up the failed add of %r failed", request_id)
                e = RequestError(f"request {request_id!r} failed: {type(e).__name__}: {e}")
            self.metrics.requests.labels(status="rejected", model_name=self.model_name).inc()
            if added is not None:
                added.set_exception(e)
            return
        if stream is None:  # a multi-host follower: the leader streams the outputs
            return
        self._streams[request_id] = stream
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        added.set_result(None)

    def _abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if not self.engine.abort(request_id) or stream is None:
            return
        self.metrics.request_finished("abort", stream.arrival)
        outputs = [CompletionOutput(k, "", [], None, "abort") for k in range(stream.num_samples)]
        stream.put(RequestOutput(request_id, None, [], outputs, True))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.error is not None:  # failed on its own (OutputProcessor): only this stream
                del self._streams[out.request_id]
                self.metrics.request_finished("error", stream.arrival)
                stream.put(RequestError(out.error))
                continue
            self.metrics.generation_tokens.inc(sum(len(c.token_ids) for c in out.outputs))
            if stream.first_token is None:
                stream.first_token = now
                self.metrics.ttft.observe(now - stream.arrival)
            for c in out.outputs:
                last = stream.last_token.get(c.index)
                if last is not None:
                    self.metrics.tpot.observe(now - last)
                stream.last_token[c.index] = now
            if out.finished:  # counted before the consumer can see the end (the server's warm-up
                # swaps its scratch metrics back as soon as its request ends)
                del self._streams[out.request_id]
                self.metrics.request_finished(out.outputs[0].finish_reason or "stop", stream.arrival)
            stream.put(out)

    def _fail_pending(self, error: BaseException) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add" and command[-1].set_running_or_notify_cancel():
                command[-1].set_exception(error)
            elif command[0].startswith("lora_") and command[-1].set_running_or_notify_cancel():
                command[-1].set_exception(error)


def _to_wire(command: tuple) -> list:
    if command[0] == "add":  # SamplingParams as its non-default fields: most adds fit inline
        _, request_id, prompt, params, lora, _, _ = command
        fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)
                  if getattr(params, f.name) != f.default}
        if fields.get("structured_outputs") is not None:  # a dataclass: sent as its fields
            fields["structured_outputs"] = dataclasses.asdict(fields["structured_outputs"])
        return ["add", request_id, prompt, fields, dataclasses.asdict(lora) if lora is not None else None]
    if command[0] == "lora_add":
        return ["lora_add", dataclasses.asdict(command[1])]
    if command[0].startswith("lora_"):
        return [command[0], command[1]]
    return list(command)


def _from_wire(wire: list) -> tuple:
    if wire[0] == "add":
        lora = LoRARequest(**wire[4]) if wire[4] is not None else None
        return ("add", wire[1], wire[2], SamplingParams(**wire[3]), lora, None, None)
    if wire[0] == "lora_add":
        return ("lora_add", LoRARequest(**wire[1]), None)
    if wire[0].startswith("lora_"):
        return (wire[0], wire[1], None)
    return tuple(wire)


def _broadcast_bytes(payload: bytes, interval: int = 1) -> tuple[bytes, int]:
    """Process 0's (payload, interval) on every process (the others pass anything).

    One collective of a fixed HEADER_BYTES buffer carries the payload length, the interval
    and the payload itself when it fits (always for an empty command list, aborts and
    ordinary adds); only a larger payload takes a second collective, of a power-of-two size,
    so the collectives compile for a handful of shapes, not one per payload length.
    """
    import numpy as np

    header = np.zeros(HEADER_BYTES, np.uint8)
    header[:_FIELDS] = np.frombuffer(np.array([len(payload), interval], "<u4").tobytes(), np.uint8)
    if len(payload) <= HEADER_BYTES - _FIELDS:
        header[_FIELDS:_FIELDS + len(payload)] = np.frombuffer(payload, np.uint8)
    header = np.asarray(_bounded_broadcast(header), np.uint8)
    n, interval = (int(v) for v in np.frombuffer(header[:_FIELDS].tobytes(), "<u4"))
    if n <= HEADER_BYTES - _FIELDS:
        return header[_FIELDS:_FIELDS + n].tobytes(), interval
    buf = np.zeros(1 << (n - 1).bit_length(), np.uint8)
    if len(payload) == n:  # the leader (the others pass b"")
        buf[:n] = np.frombuffer(payload, np.uint8)
    return np.asarray(_bounded_broadcast(buf), np.uint8)[:n].tobytes(), interval


def collective_timeout_s() -> float | None:
    """JAXSERVE_COLLECTIVE_TIMEOUT_S (default DEFAULT_COLLECTIVE_TIMEOUT_S); None for 0 (no bound)."""
    raw = os.environ.get("JAXSERVE_COLLECTIVE_TIMEOUT_S", "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_COLLECTIVE_TIMEOUT_S
    except ValueError:
        raise ValueError(f"JAXSERVE_COLLECTIVE_TIMEOUT_S must be a number of seconds, got {raw!r}") from None
    return value if value > 0 else None


def _bounded_broadcast(x):
    """multihost_utils.broadcast_one_to_all(x) (process 0's x on every process), raising
    CollectiveError when it fails (a peer closed its connection: it died) or takes longer than
    collective_timeout_s() (a peer hangs, or its host vanished without closing the connection).

    The collective is dispatched here, on the engine thread, exactly as broadcast_one_to_all
    does it: dispatching it from another thread reorders it against the engine's in-flight
    (asynchronously dispatched) step on some backends (the CPU client: gloo then sees
    mismatched collectives and aborts the process). Only the wait for its result runs in a
    daemon thread, so that the engine thread can give up on it; a timed-out wait stays
    blocked there, harmless since the engine is dead then and the process about to exit."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import PartitionSpec as P

    if jax.process_count() == 1:
        return multihost_utils.broadcast_one_to_all(x)
    timeout = collective_timeout_s()
    try:
        devices = np.array(jax.devices()).reshape(jax.process_count(), jax.local_device_count())
        mesh = jax.sharding.Mesh(devices, ("processes", "local_devices"))
        inp = x if jax.process_index() == 0 else np.zeros_like(x)
        inp = multihost_utils.host_local_array_to_global_array(np.expand_dims(inp, 0), mesh, P("processes"))
        with jax.set_mesh(mesh):
            out = jax.jit(_sum_over_processes, out_shardings=P())(inp)
        if timeout is not None:
            done: concurrent.futures.Future = concurrent.futures.Future()

            def wait() -> None:
                try:
                    done.set_result(out.block_until_ready())
                except BaseException as e:  # noqa: BLE001 - handed to the engine thread
                    done.set_exception(e)

            threading.Thread(target=wait, name="jaxserve-broadcast-wait", daemon=True).start()
            done.result(timeout=timeout)
        return jax.device_get(out.addressable_data(0))
    except concurrent.futures.TimeoutError:
        raise CollectiveError(
            f"a multi-host command broadcast did not complete within {timeout:g} s "
            "(JAXSERVE_COLLECTIVE_TIMEOUT_S): another process of the run is dead or hung") from None
    except Exception as e:  # noqa: BLE001
        raise CollectiveError(f"a multi-host command broadcast failed (another process of the run "
                              f"probably died): {type(e).__name__}: {e}") from e


def _sum_over_processes(x):
    import jax.numpy as jnp

    return jnp.sum(x, dtype=x.dtype, axis=0)
