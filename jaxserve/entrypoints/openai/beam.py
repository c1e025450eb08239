"""Beam search over HTTP (vLLM's request fields): `use_beam_search: true`, `length_penalty` and
`early_stopping` (true | false | "never", transformers' meaning).

/v1/completions: `best_of` is the beam width (n when omitted); the n best beams of each prompt
are choices i * n + k, best first; `logprobs` and `echo` (its text; echo's prompt logprobs are
not computed for beams) work as for sampling. /v1/chat/completions: n is the beam width and
every beam is a choice (vLLM's rule); tools and structured outputs are refused with it.
Streamed, each choice is one chunk once the search is done (a beam's text is not final before).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from jaxserve.engine.beam_search import BeamSearchOutput, BeamSearchParams
from jaxserve.entrypoints.openai.errors import bad_request
from jaxserve.entrypoints.openai.protocol import CompletionRequest
from jaxserve.entrypoints.openai.serving_engine import SSE_DONE, error_event, sse
from jaxserve.outputs import CompletionOutput


def _beam_search_params(serving, body, width: int, width_field: str, max_tokens: int | None) -> BeamSearchParams:
    """BeamSearchParams from a request's beam fields; an invalid width is a 400 naming
    `width_field` (the request field that carries the beam width)."""
    if body.temperature not in (None, 0, 0.0):
        raise bad_request(f"temperature must be 0 or omitted with use_beam_search, got {body.temperature}",
                          param="temperature")
    try:
        return BeamSearchParams(beam_width=width, max_tokens=max_tokens or serving.engine.max_model_len,
                                ignore_eos=body.ignore_eos, length_penalty=body.length_penalty,
                                early_stopping=body.early_stopping,
                                include_stop_str_in_output=body.include_stop_str_in_output)
    except ValueError as e:
        param = width_field if str(e).startswith("beam_width") else None
        raise (bad_request(str(e).replace("beam_width", f"{width_field} (the beam width)"), param=param) if param
               else serving.value_error(e, body)) from None


def beam_params(serving, body: CompletionRequest) -> BeamSearchParams:
    width = body.best_of if body.best_of is not None else body.n
    if body.n > width:
        raise bad_request(f"n ({body.n}) must be <= best_of ({width}), the beam width", param="n")
    return _beam_search_params(serving, body, width, "best_of", body.max_tokens)


async def beam_search_response(serving, body: CompletionRequest, prompts: list[list[int]], texts: list[str | None],
                               response_id: str) -> Any:
    params = beam_params(serving, body)
    search = asyncio.gather(*(serving.engine.beam_search(p, params, f"{response_id}-{i}")
                              for i, p in enumerate(prompts)))
    if body.stream:
        return StreamingResponse(_events(serving, body, search, texts, response_id), media_type="text/event-stream")
    try:
        outs = await search
    except ValueError as e:
        raise serving.value_error(e, body) from None
    choices = [c for i, out in enumerate(outs) for c in _choices(serving, body, i, out, texts[i])]
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(out.sequences[k].tokens) - len(p) for p, out in zip(prompts, outs)
                            for k in range(min(body.n, len(out.sequences))))
    return {"id": response_id, "object": "text_completion", "created": serving.created(),
            "model": serving.response_model(body), "choices": choices,
            "usage": serving.usage(prompt_tokens, completion_tokens)}


def _choices(serving, body: CompletionRequest, i: int, out: BeamSearchOutput, text: str | None) -> list[dict]:
    choices = []
    for k, seq in enumerate(out.sequences[:body.n]):
        generated = seq.tokens[len(seq.tokens) - len(seq.logprobs):]
        c = CompletionOutput(k, seq.text or "", generated, seq.logprobs, seq.finish_reason, seq.stop_reason)
        prefix = ""
        if body.echo:
            prompt_ids = seq.tokens[:len(seq.tokens) - len(generated)]
            prefix = text if text is not None else serving.tokenizer.decode(prompt_ids)
        logprobs = serving._logprobs(c, body.logprobs, 0)[0] if body.logprobs is not None else None
        choices.append(serving._choice(i * body.n + k, prefix + c.text, logprobs, c))
    return choices


async def _events(serving, body: CompletionRequest, search, texts: list[str | None],
                  response_id: str) -> AsyncIterator[str]:
    try:
        outs = await search
        for i, out in enumerate(outs):
            for choice in _choices(serving, body, i, out, texts[i]):
                yield sse({"id": response_id, "object": "text_completion", "created": serving.created(),
                           "model": serving.response_model(body), "choices": [choice]})
    except Exception as e:  # noqa: BLE001 - the client gets an error event, then [DONE]
        if isinstance(e, ValueError):
            e = serving.value_error(e, body)
        yield error_event(e)
    finally:
        search.cancel()
    yield SSE_DONE


# -- chat completions ---------------------------------------------------------------------


def chat_beam_params(serving, body) -> BeamSearchParams:
    """Chat has no best_of: n is the beam width and every beam is a choice (vLLM's rule)."""
    if body.tools and body.tool_choice not in (None, "none"):
        raise bad_request("use_beam_search does not combine with tools", param="use_beam_search")
    if body.response_format is not None and body.response_format.type != "text" or body.structured_outputs:
        raise bad_request("use_beam_search does not combine with structured outputs", param="use_beam_search")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return _beam_search_params(serving, body, body.n, "n", max_tokens)


async def chat_beam_search_response(serving, body, prompt_ids: list[int], response_id: str) -> Any:
    params = chat_beam_params(serving, body)
    try:
        out = await serving.engine.beam_search(prompt_ids, params, response_id)
    except ValueError as e:
        raise serving.value_error(e, body) from None
    choices = []
    for k, seq in enumerate(out.sequences):
        generated = seq.tokens[len(prompt_ids):]
        c = CompletionOutput(k, seq.text or "", generated, seq.logprobs, seq.finish_reason, seq.stop_reason)
        choices.append({"index": k, "message": {"role": "assistant", "content": c.text},
                        "logprobs": serving._logprobs(body, c), "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason})
    completion_tokens = sum(len(s.tokens) - len(prompt_ids) for s in out.sequences)
    base = {"id": response_id, "created": serving.created(), "model": serving.response_model(body)}
    usage = serving.usage(len(prompt_ids), completion_tokens)
    if not body.stream:
        return {**base, "object": "chat.completion", "choices": choices, "usage": usage}

    async def events() -> AsyncIterator[str]:  # the search is done: one chunk per beam
        for ch in choices:
            delta = {"role": "assistant", "content": ch["message"]["content"]}
            yield sse({**base, "object": "chat.completion.chunk",
                       "choices": [{"index": ch["index"], "delta": delta, "logprobs": ch["logprobs"],
                                    "finish_reason": ch["finish_reason"]}]})
        if body.stream_options is not None and body.stream_options.include_usage:
            yield sse({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        yield SSE_DONE

    return StreamingResponse(events(), media_type="text/event-stream")
