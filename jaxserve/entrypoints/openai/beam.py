"""Beam search in POST /v1/completions (vLLM's request fields): `use_beam_search: true` with
`best_of` as the beam width (n when omitted), `length_penalty` and `early_stopping`
(true | false | "never", transformers' meaning). The n best beams of each prompt are choices
i * n + k, best first; `logprobs` and `echo` work as for sampling. Streamed, each choice is
one chunk once its prompt's search is done (a beam's text is not final before that).
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


def beam_params(serving, body: CompletionRequest) -> BeamSearchParams:
    width = body.best_of if body.best_of is not None else body.n
    if body.n > width:
        raise bad_request(f"n ({body.n}) must be <= best_of ({width}), the beam width", param="n")
    if body.temperature not in (None, 0, 0.0):
        raise bad_request(f"temperature must be 0 or omitted with use_beam_search, got {body.temperature}",
                          param="temperature")
    try:
        return BeamSearchParams(beam_width=width, max_tokens=body.max_tokens or serving.engine.max_model_len,
                                ignore_eos=body.ignore_eos, length_penalty=body.length_penalty,
                                early_stopping=body.early_stopping,
                                include_stop_str_in_output=body.include_stop_str_in_output)
    except ValueError as e:
        param = "best_of" if str(e).startswith("beam_width") else None
        raise (bad_request(str(e).replace("beam_width", "best_of (the beam width)"), param=param) if param
               else serving.value_error(e, body)) from None


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
    return {"id": response_id, "object": "text_completion", "created": serving.created(), "model": serving.model_name,
            "choices": choices, "usage": serving.usage(prompt_tokens, completion_tokens)}


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
                           "model": serving.model_name, "choices": [choice]})
    except Exception as e:  # noqa: BLE001 - the client gets an error event, then [DONE]
        if isinstance(e, ValueError):
            e = serving.value_error(e, body)
        yield error_event(e)
    finally:
        search.cancel()
    yield SSE_DONE
