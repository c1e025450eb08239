"""What /v1/completions and /v1/chat/completions share: body parsing, SamplingParams,
engine requests for one or many prompts, logprob formatting, SSE, client disconnects.

A request's life (both endpoints):

    body bytes --pydantic--> request model --SamplingParams--> EngineRequests.start()
        start(): one AsyncLLM.generate per prompt, pumped by a task into one queue; waits
        until each prompt has produced its first delta, so that an engine ValueError
        (prompt too long, max_tokens too large) is still a 400, not a broken stream
    non-streaming: collect the deltas, unless the client goes away (then: abort)
    streaming: an SSE generator; when the client goes away Starlette cancels it and its
        `finally` closes the EngineRequests: pump tasks cancelled, engine requests aborted

Admission by sequences: with max_concurrent set, the Gate (app.py) caps HTTP requests, and
EngineRequests.start also caps engine sequences (prompts x n) in flight at max_concurrent:
a request needing more than the whole cap is a 400 naming `n` (or `prompt`), one that does
not fit beside the sequences in flight is a 429. A prompt's n sequences are released when
its engine request ends (all of them when the EngineRequests closes).

Off the event loop and off the engine thread: chat-template rendering and the tokenization
of string prompts run in the front end's worker pool (ServingState.executor, a few threads,
via loop.run_in_executor); the engine gets token ids, so its thread never tokenizes a big
string. Before a string is tokenized its length in characters is checked against
max_prompt_chars (max_model_len x the most characters one token can stand for): a longer
prompt cannot fit whatever it tokenizes to, and is a 400 naming max_model_len at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from jaxserve.engine.async_llm import EngineDeadError, RequestError
from jaxserve.entrypoints.lora_modules import lora_modules
from jaxserve.entrypoints.openai.structured import error_field as structured_error_field
from jaxserve.entrypoints.openai.structured import from_request as structured_from_request
from jaxserve.entrypoints.openai.access_log import register as register_access_log
from jaxserve.entrypoints.openai.errors import (OpenAIError, bad_request, engine_dead, from_validation_error,
                                                from_value_error, model_not_found, request_failed)
from jaxserve.outputs import Logprob, RequestOutput
from jaxserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
_DONE = object()
DISCONNECT_POLL_S = 0.25
CLIENT_CLOSED_REQUEST = 499  # nginx's code; the client never sees it


@dataclasses.dataclass
class ServingState:
    """Mutable state of one HTTP front end, shared by the middleware and the handlers."""

    served_model_name: str
    api_key: str | None = None
    max_concurrent: int | None = None
    draining: bool = False  # True: every request but /metrics gets 503
    ready: bool = True  # False while `jaxserve serve` warms up: the probes say "starting"
    in_flight: int = 0  # generation requests being served (the Gate's max_concurrent count)
    in_flight_seqs: int = 0  # engine sequences (prompts x n) admitted and not yet released
    request_ids: set[str] = dataclasses.field(default_factory=set)  # engine requests in flight
    max_body_bytes: int | None = None  # request bodies above: 413 (the Gate, app.py)
    read_timeout: float | None = None  # seconds a request body may take to arrive; then 408
    max_prompt_chars: int | None = None  # string prompts longer: 400 before tokenizing
    executor: concurrent.futures.Executor | None = None  # tokenization / template rendering
    # --generation-config: SamplingParams defaults for fields a request leaves unset
    sampling_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)

    async def offload(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs) in the worker pool (inline without one)."""
        if self.executor is None:
            return fn(*args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))


class EngineRequests:
    """One engine request per prompt (all with the same params), merged into one stream of
    (prompt_index, delta)."""

    def __init__(self, engine: Any, state: ServingState, prompts: list[str | list[int]],
                 params: SamplingParams, base_id: str, lora_request=None):
        self.engine, self.state, self.params = engine, state, params
        self.lora = {"lora_request": lora_request} if lora_request is not None else {}  # the adapter (by `model`)
        self.prompts = prompts
        self.ids = [base_id if len(prompts) == 1 else f"{base_id}-{i}" for i in range(len(prompts))]
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._buffered: list[tuple[int, Any]] = []
        self._closed = False
        self._held = 0  # sequences this request holds in state.in_flight_seqs
        self.prompt_tokens: dict[int, int] = {}  # prompt index -> its tokens (the access log)
        self.output_tokens = 0
        register_access_log(self, base_id)

    def _admit(self) -> None:
        """Counts this request's sequences against max_concurrent (see the module doc)."""
        state, n = self.state, max(self.params.n, self.params.best_of or 0)  # best_of: the sequences run
        cap, need = state.max_concurrent, len(self.prompts) * n
        if cap is None:
            return
        if need > cap:
            param = "n" if n > cap else "prompt"
            raise bad_request(f"{param}: this request needs {need} sequences ({len(self.prompts)} prompt(s) x n={n}), "
                              f"more than the server's max_concurrent ({cap}); lower n or send fewer prompts",
                              param=param)
        if state.in_flight_seqs + need > cap:
            raise OpenAIError(429, f"too many concurrent sequences: this request needs {need} (prompts x n) and "
                              f"{state.in_flight_seqs} of the limit of {cap} (max_concurrent) are in flight; "
                              f"retry later", type="rate_limit_error", code="rate_limit_exceeded")
        state.in_flight_seqs += need
        self._held = need

    def _release(self, count: int) -> None:
        count = min(count, self._held)
        self._held -= count
        self.state.in_flight_seqs -= count

    async def start(self) -> None:
        """Submits every prompt; returns once each has produced its first delta. Raises the
        engine's ValueError (or EngineDeadError) after aborting all of them; an OpenAIError
        (400 / 429) when the sequences do not fit max_concurrent."""
        self._admit()
        self.state.request_ids.update(self.ids)
        self._tasks = [asyncio.create_task(self._pump(i, rid, p))
                       for i, (rid, p) in enumerate(zip(self.ids, self.prompts))]
        waiting = set(range(len(self.prompts)))
        try:
            while waiting:
                i, item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                self._buffered.append((i, item))
                waiting.discard(i)
        except BaseException:
            self.close()
            raise

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        open_ = len(self.prompts)
        buffered, self._buffered = self._buffered, []
        for i, item in buffered:
            if item is _DONE:
                open_ -= 1
            else:
                yield i, item
        while open_:
            i, item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is _DONE:
                open_ -= 1
            else:
                yield i, item

    def close(self) -> None:
        """Cancels the pumps and aborts every engine request (synchronous: safe to call from
        a `finally` inside a cancelled task)."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for rid in self.ids:
            if rid in self.state.request_ids:
                self.engine.abort(rid)
        self.state.request_ids.difference_update(self.ids)
        self._release(self._held)

    async def _pump(self, i: int, rid: str, prompt: str | list[int]) -> None:
        finished = False
        try:
            async for delta in self.engine.generate(prompt, self.params, rid, **self.lora):
                finished = delta.finished
                if delta.prompt_token_ids:
                    self.prompt_tokens[i] = len(delta.prompt_token_ids)
                self.output_tokens += sum(len(c.token_ids) for c in delta.outputs)
                self._queue.put_nowait((i, delta))
        except Exception as e:  # noqa: BLE001 - ValueError / EngineDeadError go to the reader
            self._queue.put_nowait((i, e))
        finally:
            if not finished:  # also covers a cancel while the add was still in flight
                self.engine.abort(rid)
            self.state.request_ids.discard(rid)
            self._release(max(self.params.n, self.params.best_of or 0))
            self._queue.put_nowait((i, _DONE))


class OpenAIServing:
    """Base of the two generation endpoints."""

    request_model: type[BaseModel]
    aliases: dict[str, str] = {}  # engine / SamplingParams field -> request field

    def __init__(self, engine: Any, state: ServingState):
        self.engine, self.state = engine, state
        self.tokenizer = engine.tokenizer
        self._token_text: dict[int, str] = {}

    @property
    def model_name(self) -> str:
        return self.state.served_model_name

    def response_model(self, body: Any) -> str:
        """The `model` a response reports: the one the request named (the base model or a LoRA
        adapter, as vLLM answers), else the served model's name."""
        return getattr(body, "model", None) or self.model_name

    # -- input ------------------------------------------------------------------------

    def parse(self, raw: bytes, model: type[M]) -> M:
        try:
            body = model.model_validate_json(raw)
        except ValidationError as e:
            raise from_validation_error(e, model.model_fields) from None
        model_name = getattr(body, "model", None)
        if model_name is not None and model_name != self.model_name and not lora_modules(self.engine).resolve(
                model_name):  # the base model or a LoRA adapter's name (entrypoints.lora_modules)
            raise model_not_found(model_name)
        return body

    def check_chars(self, n_chars: int, param: str) -> None:
        """The cheap pre-check before tokenizing (see the module doc)."""
        limit = self.state.max_prompt_chars
        if limit is not None and n_chars > limit:
            raise bad_request(_named(param, f"prompt has {n_chars} characters, more than any prompt that fits "
                                     f"max_model_len ({self.engine.max_model_len} tokens) can have ({limit} "
                                     f"characters)"), param=param)

    def encode(self, text: str) -> list[int]:
        """A string prompt's token ids, exactly as the engine would tokenize it."""
        return list(self.tokenizer(text)["input_ids"])

    async def tokenize_prompts(self, prompts: list[str | list[int]], param: str = "prompt") -> list[str | list[int]]:
        """Each non-empty string prompt checked (check_chars) and tokenized in the worker
        pool; token-id prompts longer than the context refused without the engine."""
        out: list[str | list[int]] = []
        limit = self.engine.max_model_len
        for p in prompts:
            if isinstance(p, str) and p:
                self.check_chars(len(p), param)
                out.append(await self.state.offload(self.encode, p))
            else:
                out.append(p)
            if isinstance(out[-1], list) and len(out[-1]) >= limit:
                raise bad_request(_named(param, f"prompt has {len(out[-1])} tokens; max_model_len is {limit}, so at "
                                         f"most {limit - 1} prompt tokens leave room for one generated token"),
                                  param=param)
        return out

    def value_error(self, e: ValueError, body: BaseModel) -> OpenAIError:
        aliases = {**self.aliases_for(body), "structured_outputs": structured_error_field(body)}
        return from_value_error(e, type(body).model_fields, aliases)

    def aliases_for(self, body: BaseModel) -> dict[str, str]:
        return self.aliases

    def sampling_params(self, body: Any, *, max_tokens: int | None, logprobs: int | None,
                        **extra: Any) -> SamplingParams:
        """extra: more SamplingParams fields (an endpoint's own, e.g. prompt_logprobs)."""
        kwargs: dict[str, Any] = dict(**extra,
            n=body.n, max_tokens=max_tokens, seed=body.seed, stop=body.stop, ignore_eos=body.ignore_eos,
            min_tokens=body.min_tokens, stop_token_ids=body.stop_token_ids,
            skip_special_tokens=body.skip_special_tokens, include_stop_str_in_output=body.include_stop_str_in_output,
            logprobs=logprobs, logit_bias=body.logit_bias_ids(), structured_outputs=structured_from_request(body))
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                     "repetition_penalty"):
            if getattr(body, name) is not None:
                kwargs[name] = getattr(body, name)
            elif name in self.state.sampling_defaults:
                kwargs[name] = self.state.sampling_defaults[name]
        if max_tokens is None and "max_tokens" in self.state.sampling_defaults:
            kwargs["max_tokens"] = self.state.sampling_defaults["max_tokens"]
        try:
            return SamplingParams(**kwargs)
        except ValueError as e:
            raise self.value_error(e, body) from None

    async def start(self, body: BaseModel, prompts: list, params: SamplingParams, base_id: str) -> EngineRequests:
        requests = EngineRequests(self.engine, self.state, prompts, params, base_id,
                                  lora_request=lora_modules(self.engine).resolve(getattr(body, "model", None)))
        try:
            await requests.start()
        except ValueError as e:
            raise self.value_error(e, body) from None
        except EngineDeadError as e:
            raise engine_dead(e) from None
        except RequestError as e:
            raise request_failed(e) from None
        return requests

    # -- output -----------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    def top_logprobs(self, entry: dict[int, Logprob], k: int) -> list[tuple[int, float]]:
        ranked = sorted((lp.rank, tid, lp.logprob) for tid, lp in entry.items()
                        if lp.rank is not None and lp.rank <= k)
        return [(tid, lp) for _, tid, lp in ranked]

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    @staticmethod
    def created() -> int:
        return int(time.time())


def _named(param: str, message: str) -> str:
    """Messages start with the request's field (as from_value_error writes them)."""
    return message if message.startswith(param) else f"{param}: {message}"


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def error_event(e: Exception) -> str:
    """An error in the middle of a stream (the status line has gone already)."""
    if isinstance(e, EngineDeadError):
        e = engine_dead(e)
    elif isinstance(e, RequestError):
        e = request_failed(e)
    elif not isinstance(e, OpenAIError):
        log.exception("error while streaming a response")
        e = OpenAIError(500, f"internal error: {type(e).__name__}", type="server_error")
    return sse(e.body())


def stream_response(requests: EngineRequests, events: Callable[[], AsyncIterator[str]]) -> StreamingResponse:
    """An SSE response over `events`; the engine requests are closed however it ends."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events():
                yield event
        except Exception as e:  # noqa: BLE001 - the client gets an error event, then [DONE]
            yield error_event(e)
            yield SSE_DONE
        finally:
            requests.close()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def unless_disconnected(request: Request, requests: EngineRequests,
                              work: Callable[[], Awaitable[T]]) -> T | Response:
    """Runs `work`; if the client disconnects first, aborts the engine requests."""
    task = asyncio.ensure_future(work())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                return Response(status_code=CLIENT_CLOSED_REQUEST)
    except EngineDeadError as e:
        raise engine_dead(e) from None
    except RequestError as e:
        raise request_failed(e) from None
    finally:
        if not task.done():
            task.cancel()
        requests.close()
