"""The FastAPI app of the OpenAI-compatible front end.

Every request first passes the Gate, a plain ASGI middleware, in this order:

    1. path normalised (`//v1//completions/`, `/x/../v1/completions` -> `/v1/completions`),
       so that routing and auth see the same path and no variant slips past either
    2. draining -> 503 (except /metrics and the probes /health, /ready, /live, which say draining)
    3. api_key set -> every path except /health and /metrics needs `Authorization: Bearer
       KEY` (hmac.compare_digest), unknown paths included -> 401
    4. the body is read whole, before anything else sees it: a Content-Length above
       max_request_body_bytes is a 413 before a byte of it is read, a chunked body is
       counted as it arrives (413 once past the limit); a body not complete within
       request_read_timeout seconds is a 408 (both answers close the connection); a client
       that goes away while uploading is dropped quietly (a debug line)
    5. generation routes over max_concurrent in flight -> 429; counted only now, after the
       body has arrived (a slow upload holds no slot), and held until the response (stream
       included) has been sent, which is also what drain waits for

Outside the Gate, AccessLog (access_log.py) writes one line per request and counts refusals
by reason (jaxserve_requests_rejected_total).

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models[/{id}] (LoRA adapters too),
POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter (openai/lora_routes.py),
GET /health, GET /ready, GET /live (openai/probes.py), GET /metrics, POST /tokenize, POST /detokenize.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import logging
import posixpath
import re
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from jaxserve.engine.input_processor import max_chars_per_token
from jaxserve.entrypoints.lora_modules import lora_modules
from jaxserve.entrypoints.openai.access_log import AccessLog
from jaxserve.entrypoints.openai.lora_routes import add_lora_routes
from jaxserve.entrypoints.openai.errors import OpenAIError, bad_request
from jaxserve.entrypoints.openai.protocol import DetokenizeRequest, TokenizeRequest
from jaxserve.entrypoints.openai.generation_config import load_generation_defaults, model_dir_of
from jaxserve.entrypoints.openai.probes import PROBE_PATHS, probe_response
from jaxserve.entrypoints.openai.serving_chat import OpenAIServingChat, load_chat_template
from jaxserve.entrypoints.openai.serving_completion import OpenAIServingCompletion
from jaxserve.entrypoints.openai.serving_engine import ServingState

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/metrics"}) | PROBE_PATHS
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_READ_TIMEOUT_S = 30.0
TOKENIZE_WORKERS = 4


class _ClientGone(Exception):
    """The client disconnected before its request body had arrived."""


def normalize_path(path: str) -> str:
    """Collapses repeated slashes, resolves `.` and `..`, drops a trailing slash."""
    return posixpath.normpath(re.sub(r"/+", "/", "/" + path))


class Gate:
    """Path normalisation, draining, auth and the concurrency cap (see the module doc)."""

    def __init__(self, app: ASGIApp, state: ServingState):
        self.app, self.state = app, state
        self._key = state.api_key.encode() if state.api_key is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # no websocket routes: nothing to serve, authenticated or not
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        path = normalize_path(scope["path"])
        scope = dict(scope, path=path, raw_path=path.encode())
        error = self._refuse(scope, path)
        if error is not None:
            await error.response()(scope, receive, send)
            return
        try:
            body = await self._read_body(scope, receive)
        except _ClientGone:
            log.debug("client went away while sending the body of %s %s", scope.get("method"), path)
            return
        except OpenAIError as e:
            response = e.response()
            response.headers["connection"] = "close"  # the rest of the body is never read
            await response(scope, receive, send)
            return
        receive = _replay(body, receive)
        if path not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        error = self._admit()
        if error is not None:
            await error.response()(scope, receive, send)
            return
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1

    def _refuse(self, scope: Scope, path: str) -> OpenAIError | None:
        state = self.state
        if state.draining and path != "/metrics" and path not in PROBE_PATHS:
            return _draining()
        if self._key is not None and path not in PUBLIC_PATHS and not self._authorized(scope):
            return OpenAIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
        return None

    def _admit(self) -> OpenAIError | None:
        state = self.state
        if state.draining:  # began while the body was arriving
            return _draining()
        if not state.ready:  # `jaxserve serve` warming up: the warm-up is the only request
            return OpenAIError(503, "the server is starting: warming up; retry when /ready answers 200",
                               type="server_error", code="server_starting")
        if state.max_concurrent is not None and state.in_flight >= state.max_concurrent:
            return OpenAIError(429, f"too many concurrent requests (the limit is {state.max_concurrent}); retry later",
                               type="rate_limit_error", code="rate_limit_exceeded")
        return None

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The whole body within the size limit and the read timeout (see the module doc)."""
        limit, timeout = self.state.max_body_bytes, self.state.read_timeout
        if limit is not None:
            for name, value in scope.get("headers", ()):
                if name.lower() == b"content-length":
                    try:
                        length = int(value)
                    except ValueError:
                        raise bad_request("the Content-Length header is not a number") from None
                    if length > limit:
                        raise _too_large(limit, f"Content-Length is {length}")
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                if deadline is None:
                    message = await receive()
                else:
                    message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                raise OpenAIError(408, f"the request body did not arrive within the server's read timeout of "
                                  f"{timeout:g} s (request_read_timeout); {size} bytes came", code="request_timeout",
                                  type="invalid_request_error") from None
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if limit is not None and size > limit:
                    raise _too_large(limit, f"more than {limit} bytes came")
                chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _authorized(self, scope: Scope) -> bool:
        given = b""
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
        return hmac.compare_digest(given, self._key)


def _draining() -> OpenAIError:
    return OpenAIError(503, "the server is shutting down", type="server_error", code="draining")


def _too_large(limit: int, what: str) -> OpenAIError:
    return OpenAIError(413, f"the request body is larger than the server's limit of {limit} bytes "
                       f"(max_request_body_bytes): {what}", code="request_too_large")


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the app the body already read, then the client's own messages
    (disconnect detection)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> dict:
        if pending:
            return pending.pop()
        return await receive()

    return replay


def check_app_options(*, api_key: str | None = None, max_concurrent: int | None = None,
                      max_request_body_bytes: int | None = None, request_read_timeout: float | None = None,
                      chat_template: str | None = None, generation_config: str | None = None, **_: Any) -> None:
    """build_app's option checks that need no engine (a bad flag fails before the model loads)."""
    if max_concurrent is not None and max_concurrent < 1:
        raise ValueError(f"max_concurrent must be >= 1 or None, got {max_concurrent}")
    if api_key is not None and not api_key:
        raise ValueError("api_key must not be empty (use None for no auth)")
    if max_request_body_bytes is not None and max_request_body_bytes < 1:
        raise ValueError(f"max_request_body_bytes must be >= 1 or None, got {max_request_body_bytes}")
    if request_read_timeout is not None and not request_read_timeout > 0:
        raise ValueError(f"request_read_timeout must be > 0 or None, got {request_read_timeout}")
    if chat_template is not None:
        load_chat_template(chat_template)
    load_generation_defaults(generation_config, None)


def build_app(engine: Any, *, served_model_name: str, api_key: str | None = None, max_concurrent: int | None = None,
              chat_template: str | None = None, tool_parser: str | None = None,
              max_request_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
              request_read_timeout: float | None = DEFAULT_READ_TIMEOUT_S,
              generation_config: str | None = None, enable_auto_tool_choice: bool | None = None,
              log_requests: bool = True) -> FastAPI:
    """The OpenAI-compatible app over an AsyncLLM. `chat_template` is a file path or the
    Jinja text; `tool_parser` is "hermes" or "llama3_json" (None: no tool-call parsing).
    `max_request_body_bytes` (413 above) and `request_read_timeout` (seconds; 408 after):
    None for no limit. `generation_config`: "auto" | "vllm" | a directory (openai.generation_config)."""
    check_app_options(api_key=api_key, max_concurrent=max_concurrent, max_request_body_bytes=max_request_body_bytes,
                      request_read_timeout=request_read_timeout)
    state = ServingState(served_model_name, api_key=api_key, max_concurrent=max_concurrent,
                         max_body_bytes=max_request_body_bytes, read_timeout=request_read_timeout,
                         max_prompt_chars=engine.max_model_len * max_chars_per_token(engine.tokenizer),
                         executor=concurrent.futures.ThreadPoolExecutor(TOKENIZE_WORKERS,
                                                                        thread_name_prefix="jaxserve-tokenize"),
                         sampling_defaults=load_generation_defaults(generation_config, model_dir_of(engine)))
    completions = OpenAIServingCompletion(engine, state)
    chat = OpenAIServingChat(engine, state, chat_template=chat_template, tool_parser=tool_parser,
                             enable_auto_tool_choice=enable_auto_tool_choice)
    app = FastAPI(title="jaxserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.jaxserve = state
    app.state.engine = engine
    _add_error_handlers(app)
    _add_routes(app, engine, state, completions, chat)
    app.add_middleware(Gate, state=state)
    app.add_middleware(AccessLog, engine=engine, enabled=log_requests)  # outermost: sees every answer
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, e: OpenAIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return OpenAIError(e.status_code, str(e.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error in a request")
        return OpenAIError(500, f"internal error: {type(e).__name__}", type="server_error").response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return bad_request(str(e.errors()[0].get("msg", e))).response()


def _add_routes(app: FastAPI, engine: Any, state: ServingState, completions: OpenAIServingCompletion,
                chat: OpenAIServingChat) -> None:
    created = int(time.time())
    model_card = {"id": state.served_model_name, "object": "model", "created": created, "owned_by": "jaxserve",
                  "root": state.served_model_name, "max_model_len": engine.max_model_len}

    @app.post("/v1/completions")
    async def create_completion(request: Request) -> Response:
        return _json(await completions.create(request))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: Request) -> Response:
        return _json(await chat.create(request))

    adapters = lora_modules(engine)  # LoRA adapters by name: listed with the base model as parent
    add_lora_routes(app, engine, completions.parse)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card, *adapters.cards(state.served_model_name, created)]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict:
        cards = {c["id"]: c for c in adapters.cards(state.served_model_name, created)}
        if model != state.served_model_name and model not in cards:
            raise OpenAIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return cards.get(model, model_card)

    def status() -> str:
        if state.draining:  # first: the engine is shut down as the last step of a drain
            return "draining"
        if not engine.healthy:
            return "engine not running"
        return "starting" if not state.ready else "ok"

    @app.get("/health")
    async def health() -> Response:
        return probe_response("/health", status())

    @app.get("/ready")
    async def ready() -> Response:
        return probe_response("/ready", status())

    @app.get("/live")
    async def live() -> Response:
        return probe_response("/live", status())

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        body = completions.parse(await request.body(), TokenizeRequest)
        if body.messages is not None:
            ids = await chat.render_async(body.messages, add_generation_prompt=body.add_generation_prompt)
        else:
            ids = await state.offload(_encode, engine.tokenizer, body.prompt, body.add_special_tokens)
        # a big answer is rendered in the pool too, in slices (json.dumps of 10^6 ints holds
        # the GIL for ~0.1 s in one call; between slices the event loop gets its turn)
        content = await state.offload(_tokenize_json, ids, engine.max_model_len)
        return Response(content, media_type="application/json")

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body = completions.parse(await request.body(), DetokenizeRequest)
        vocab = len(engine.tokenizer)
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"tokens must be in [0, {vocab}), got {bad[0]}", param="tokens")
        return {"prompt": await state.offload(engine.tokenizer.decode, body.tokens)}


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _tokenize_json(ids: list[int], max_model_len: int, slice_len: int = 16384) -> bytes:
    """{"count", "max_model_len", "tokens"} as JSONResponse renders it."""
    parts = [b'{"count":%d,"max_model_len":%d,"tokens":[' % (len(ids), max_model_len)]
    for i in range(0, len(ids), slice_len):
        parts.append((b"," if i else b"") + ",".join(map(str, ids[i:i + slice_len])).encode())
    parts.append(b"]}")
    return b"".join(parts)


def _json(result: Response | dict) -> Response:
    return result if isinstance(result, Response) else JSONResponse(result)


__all__ = ["Gate", "build_app", "normalize_path"]
