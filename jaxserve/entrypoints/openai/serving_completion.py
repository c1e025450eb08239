"""POST /v1/completions: one or many prompts (strings or token ids), n samples each.

Choice i * n + k is sample k of prompt i, as OpenAI numbers them. `logprobs` uses the
legacy completions shape (tokens / token_logprobs / top_logprobs / text_offset). With `echo`,
`logprobs` covers the prompt's tokens first (the first one has no logprob, as OpenAI), from
the engine's prompt logprobs; vLLM's extra `prompt_logprobs` adds them in its own shape
(`choices[i].prompt_logprobs`: None, then {token id: {logprob, rank, decoded_token}}).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from jaxserve.outputs import merge_delta
from jaxserve.entrypoints.openai.beam import beam_search_response
from jaxserve.entrypoints.openai.errors import bad_request
from jaxserve.entrypoints.openai.protocol import CompletionRequest
from jaxserve.entrypoints.openai.serving_engine import (SSE_DONE, EngineRequests, OpenAIServing, sse, stream_response,
                                            unless_disconnected)
from jaxserve.outputs import CompletionOutput, Logprob, RequestOutput

MAX_PROMPTS = 256  # prompts in one request


class OpenAIServingCompletion(OpenAIServing):
    aliases = {"prompt_token_ids": "prompt"}

    async def create(self, request: Request) -> Response:
        body = self.parse(await request.body(), CompletionRequest)
        self._check_supported(body)
        prompts = self._prompts(body)
        params = self.sampling_params(body, max_tokens=body.max_tokens, logprobs=body.logprobs,
                                      prompt_logprobs=self._prompt_logprobs(body),
                                      best_of=None if body.use_beam_search else body.best_of)
        texts = [p if isinstance(p, str) else None for p in prompts]  # for echo: the text as sent
        prompts = await self.tokenize_prompts(prompts)  # the engine gets token ids
        response_id = self.new_id("cmpl")
        if body.use_beam_search:
            return await beam_search_response(self, body, prompts, texts, response_id)
        requests = await self.start(body, prompts, params, response_id)
        if body.stream:
            return stream_response(requests, lambda: self._events(body, requests, response_id, texts))
        return await unless_disconnected(request, requests,
                                         lambda: self._collect(body, requests, response_id, texts))

    @staticmethod
    def _check_supported(body: CompletionRequest) -> None:
        if body.suffix is not None:
            raise bad_request("suffix is not supported", param="suffix")

    @staticmethod
    def _prompt_logprobs(body: CompletionRequest) -> int | None:
        """Top logprobs per prompt position the engine computes: echo's and prompt_logprobs'."""
        wanted = [k for k in (body.prompt_logprobs, body.logprobs if body.echo else None) if k is not None]
        return max(wanted) if wanted else None

    @staticmethod
    def _prompts(body: CompletionRequest) -> list[str | list[int]]:
        p = body.prompt
        if isinstance(p, str):
            prompts: list = [p]
        elif p and isinstance(p[0], int):
            prompts = [p]
        else:
            prompts = list(p)
        if not prompts:
            raise bad_request("prompt must not be empty", param="prompt")
        if len(prompts) > MAX_PROMPTS:
            raise bad_request(f"prompt must hold at most {MAX_PROMPTS} prompts, got {len(prompts)}", param="prompt")
        return prompts

    # -- non-streaming ----------------------------------------------------------------

    async def _collect(self, body: CompletionRequest, requests: EngineRequests, response_id: str,
                       texts: list[str | None]) -> dict:
        acc: dict[int, RequestOutput] = {}
        async for i, delta in requests:
            acc[i] = merge_delta(acc.get(i), delta)
        choices, completion_tokens = [], 0
        for i in range(len(requests.prompts)):
            out = acc[i]
            prefix = self._prompt_text(out, texts[i]) if body.echo else ""
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                logprobs = None
                if body.logprobs is not None:
                    logprobs, _ = self._logprobs(c, body.logprobs, 0, self._echoed(body, out))
                choices.append(self._choice(i * body.n + c.index, prefix + c.text, logprobs, c,
                                            self._vllm_prompt_logprobs(body, out)))
        prompt_tokens = sum(len(acc[i].prompt_token_ids) for i in acc)
        return {"id": response_id, "object": "text_completion", "created": self.created(),
                "model": self.response_model(body), "choices": choices,
                "usage": self.usage(prompt_tokens, completion_tokens)}

    # -- streaming --------------------------------------------------------------------

    async def _events(self, body: CompletionRequest, requests: EngineRequests, response_id: str,
                      texts: list[str | None]) -> AsyncIterator[str]:
        created = self.created()
        options = body.stream_options
        include_usage = options is not None and options.include_usage
        continuous = include_usage and options.continuous_usage_stats
        prompt_tokens: dict[int, int] = {}
        completion_tokens = 0
        offsets: dict[int, int] = defaultdict(int)
        echoed: set[int] = set()
        prompt_logprobs: dict[int, RequestOutput] = {}  # prompt index -> its delta with the prompt logprobs
        async for i, delta in requests:
            prompt_tokens[i] = len(delta.prompt_token_ids)
            if delta.prompt_logprobs is not None:
                prompt_logprobs[i] = delta
            for c in delta.outputs:
                index = i * body.n + c.index
                completion_tokens += len(c.token_ids)
                text = c.text
                first = index not in echoed
                echoed.add(index)
                if body.echo and first:
                    text = self._prompt_text(delta, texts[i]) + text
                with_prompt = prompt_logprobs.get(i) if first else None
                logprobs = None
                if body.logprobs is not None and (c.logprobs or first):
                    logprobs, offsets[index] = self._logprobs(c, body.logprobs, offsets[index],
                                                              self._echoed(body, with_prompt))
                if not text and logprobs is None and c.finish_reason is None:
                    continue  # a token the detokenizer holds back (partial character, stop prefix)
                choice = self._choice(index, text, logprobs, c, self._vllm_prompt_logprobs(body, with_prompt))
                chunk: dict[str, Any] = {"id": response_id, "object": "text_completion", "created": created,
                                         "model": self.response_model(body), "choices": [choice]}
                if include_usage:
                    chunk["usage"] = (self.usage(sum(prompt_tokens.values()), completion_tokens)
                                      if continuous else None)
                yield sse(chunk)
        if include_usage:
            yield sse({"id": response_id, "object": "text_completion", "created": created,
                       "model": self.response_model(body), "choices": [],
                       "usage": self.usage(sum(prompt_tokens.values()), completion_tokens)})
        yield SSE_DONE

    # -- pieces -----------------------------------------------------------------------

    @staticmethod
    def _choice(index: int, text: str, logprobs: dict | None, c: CompletionOutput,
                prompt_logprobs: list | None = None) -> dict[str, Any]:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason,
                  "stop_reason": c.stop_reason}
        if prompt_logprobs is not None:
            choice["prompt_logprobs"] = prompt_logprobs
        return choice

    @staticmethod
    def _echoed(body: CompletionRequest, out: RequestOutput | None) -> tuple[list[int], list] | None:
        """The prompt's (token ids, logprob entries) that echo puts before the completion's."""
        if not body.echo or out is None or out.prompt_logprobs is None:
            return None
        return out.prompt_token_ids, out.prompt_logprobs

    def _vllm_prompt_logprobs(self, body: CompletionRequest, out: RequestOutput | None) -> list | None:
        if body.prompt_logprobs is None or out is None or out.prompt_logprobs is None:
            return None
        k = body.prompt_logprobs
        return [None if entry is None else
                {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": self.token_text(t)}
                 for t, lp in entry.items() if t == tok or (lp.rank is not None and lp.rank <= k)}
                for tok, entry in zip(out.prompt_token_ids, out.prompt_logprobs)]

    def _prompt_text(self, out: RequestOutput, text: str | None) -> str:
        if text is not None:
            return text
        return out.prompt if out.prompt is not None else self.tokenizer.decode(out.prompt_token_ids)

    def _logprobs(self, c: CompletionOutput, k: int, offset: int,
                  prompt: tuple[list[int], list] | None = None) -> tuple[dict[str, list], int]:
        """The legacy completions logprobs of c's tokens, after the prompt's (token ids, entries)
        when given (echo; its first token has none); text offsets start at `offset`."""
        tokens, token_logprobs, top, offsets = [], [], [], []
        pairs = list(zip(*prompt)) if prompt is not None else []
        for token_id, entry in pairs + list(zip(c.token_ids, c.logprobs or [])):
            text = self.token_text(token_id)
            tokens.append(text)
            if entry is None:  # the prompt's first token: nothing precedes it
                token_logprobs.append(None)
                top.append(None)
                offsets.append(offset)
                offset += len(text)
                continue
            sampled: Logprob | None = entry.get(token_id)
            token_logprobs.append(sampled.logprob if sampled is not None else None)
            ranked = {self.token_text(t): lp for t, lp in self.top_logprobs(entry, k)}
            if sampled is not None:
                ranked.setdefault(text, sampled.logprob)
            top.append(ranked)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}, offset
