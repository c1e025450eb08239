"""Helpers of the gRPC tests: servers on an asyncio loop in a background thread, engine
idleness checks, a failing engine, and a client interceptor that adds the API key."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import Any

import grpc

from jaxserve.engine.async_llm import AsyncLLM
from jaxserve.entrypoints.grpc.server import GrpcFrontend


class LoopThread:
    """An asyncio event loop in a daemon thread: the servers under test run there, while
    the tests (sync clients, or asyncio.run with async clients) call them from the main thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-test-loop", daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start_frontend(self, engine: AsyncLLM, **options) -> GrpcFrontend:
        frontend = GrpcFrontend(engine, host="127.0.0.1", port=0, **options)
        self.run(frontend.start())
        self.run(frontend.set_serving(True))
        return frontend

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def wait_engine_idle(engine: AsyncLLM, timeout: float = 20.0) -> dict:
    """Waits until no request is left and every page is free again; returns the stats."""
    deadline = time.monotonic() + timeout
    if hasattr(engine, "wait_idle"):
        engine.wait_idle(timeout)
    while True:
        stats = engine.stats()
        idle = (engine.num_in_flight == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0
                and stats["num_free_pages"] == stats["num_total_pages"])
        if idle or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


class FailingEngine:
    """Stands in for LLMEngine in an AsyncLLM: accepts requests, then its first step fails
    (a lost device), which kills the AsyncLLM."""

    def __init__(self, real):
        self.config, self.tokenizer, self.max_model_len = real.config, real.tokenizer, real.max_model_len
        self._pending: set[str] = set()

    def add_request(self, request_id, prompt, params) -> list[int]:
        self._pending.add(request_id)
        return [1, 2, 3]

    def has_unfinished_requests(self) -> bool:
        return bool(self._pending)

    def step(self):
        raise RuntimeError("device lost")

    def abort(self, request_id) -> bool:
        found = request_id in self._pending
        self._pending.discard(request_id)
        return found

    def stats(self) -> dict:
        keys = ("compile_count", "num_free_pages", "num_total_pages", "num_preemptions", "prefix_cache_hit_tokens",
                "prefix_cache_query_tokens", "num_running", "num_waiting")
        return dict.fromkeys(keys, 0)


class _CallDetails(collections.namedtuple("_CallDetails", "method timeout metadata credentials wait_for_ready "
                                                         "compression"), grpc.ClientCallDetails):
    pass


class BearerInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                        grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer KEY` to every call of a channel (for clients that take no
    metadata, like the reflection database), as `grpcurl -H` does."""

    def __init__(self, api_key: str):
        self._header = ("authorization", f"Bearer {api_key}")

    def _details(self, d):
        return _CallDetails(d.method, d.timeout, list(d.metadata or ()) + [self._header], d.credentials,
                            d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)
