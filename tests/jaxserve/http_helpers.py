"""Shared pieces of the HTTP tests: a real uvicorn server on 127.0.0.1 in a background
thread's event loop, and a scripted engine (no JAX) whose model output the test chooses."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from jaxserve.engine.metrics import EngineMetrics
from jaxserve.entrypoints.openai import HttpFrontend
from jaxserve.outputs import CompletionOutput, RequestOutput

CPU = str(Path(__file__).parents[2] / "configs" / "cpu.yaml")
MODEL = "tiny-llama"


class ServerThread:
    """One asyncio loop in a daemon thread; HTTP front ends are started and stopped in it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="http-test-loop", daemon=True)
        self._thread.start()
        self.frontends: list[HttpFrontend] = []

    def run(self, coro, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve(self, engine: Any, **kwargs: Any) -> HttpFrontend:
        kwargs.setdefault("served_model_name", MODEL)
        frontend = HttpFrontend(engine, host="127.0.0.1", port=0, **kwargs)
        self.run(frontend.start())
        self.frontends.append(frontend)
        return frontend

    def stop(self, frontend: HttpFrontend, grace: float = 5.0) -> None:
        self.run(frontend.stop(grace), timeout=grace + 30)
        self.frontends.remove(frontend)

    def close(self) -> None:
        for frontend in list(self.frontends):
            self.stop(frontend, grace=1.0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def base_url(frontend: HttpFrontend) -> str:
    return f"http://127.0.0.1:{frontend.port}"


class ScriptedEngine:
    """Duck-types AsyncLLM for the front end: every request "generates" the scripted text,
    split into the scripted pieces (one delta each, one token id per piece, `delay` seconds
    apart)."""

    def __init__(self, tokenizer: Any, pieces: list[str] | None = None, max_model_len: int = 512,
                 delay: float = 0.0):
        self.tokenizer, self.max_model_len, self.delay = tokenizer, max_model_len, delay
        self.pieces = pieces or ["Hello"]
        self.metrics = EngineMetrics("scripted")
        self.healthy = True
        self.model_name = "scripted"
        self.aborted: list[str] = []
        self.prompts: list[list[int]] = []  # token ids of every request, in order

    async def generate(self, prompt, params, request_id):
        ids = prompt if isinstance(prompt, list) else self.tokenizer.encode(prompt)
        self.prompts.append(list(ids))
        for k, piece in enumerate(self.pieces):
            await asyncio.sleep(self.delay)
            last = k == len(self.pieces) - 1
            outputs = [CompletionOutput(s, piece, [k + 1], None, "stop" if last else None) for s in range(params.n)]
            yield RequestOutput(request_id, None, list(ids), outputs, last)

    def script(self, text: str, size: int = 3) -> None:
        """The next requests generate `text`, `size` characters per delta."""
        self.pieces = [text[i:i + size] for i in range(0, len(text), size)]

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
