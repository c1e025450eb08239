"""POST /v1/chat/completions: chat template, tools, tool-call parsing, chat logprobs.

The prompt is the tokenizer's chat template (or the --chat-template override) rendered
with add_generation_prompt and tokenized WITHOUT special tokens: the template writes the
BOS itself, and tokenizing with them would add a second one.

Tools:
  tool_choice "none"      the template does not see the tools; nothing is parsed.
  "auto"                  the template sees every tool; the configured parser (hermes |
                          llama3_json) turns tool-call text into tool_calls.
  "required"              the template sees every tool; a grammar built from the tools'
                          schemas enforces a JSON array of calls (openai/structured.py),
                          read into tool_calls; no parser needed.
  a named function        the template sees only that tool; a grammar enforces its
                          parameters schema: the whole answer is that call's arguments.
  Without --enable-auto-tool-choice and a parser, tools default to tool_choice "none";
  "auto" is a 400 (vLLM's rule).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from jaxserve.engine.chat import ChatTemplateError, render_chat
from jaxserve.outputs import merge_delta
from jaxserve.entrypoints.openai.beam import chat_beam_params, chat_beam_search_response
from jaxserve.entrypoints.openai.errors import bad_request
from jaxserve.entrypoints.openai.protocol import ChatCompletionRequest, ChatMessage, NamedToolChoice
from jaxserve.entrypoints.openai.serving_engine import (SSE_DONE, EngineRequests, OpenAIServing, ServingState, sse,
                                            stream_response, unless_disconnected)
from jaxserve.entrypoints.openai.structured import tool_constraint
from jaxserve.entrypoints.openai.tool_parsers import ToolParser, ToolStreamer, get_tool_parser, tool_calls_json
from jaxserve.outputs import CompletionOutput

# apply_chat_template's own arguments: chat_template_kwargs may not override them.
_RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "messages", "tools", "documents", "chat_template",
                                       "add_generation_prompt", "continue_final_message", "tokenize", "padding",
                                       "truncation", "max_length", "return_tensors", "return_dict",
                                       "return_assistant_tokens_mask", "tokenizer_kwargs"})


def load_chat_template(template: str | None) -> str | None:
    """A --chat-template value: a file path or the Jinja text itself."""
    if template is None:
        return None
    try:
        path = Path(template).expanduser()
        if path.is_file():
            return path.read_text()
    except OSError:  # a long template is not a valid path
        pass
    if "{{" in template or "{%" in template:
        return template
    raise ValueError(f"chat_template {template!r} is neither a file nor a Jinja template")


class OpenAIServingChat(OpenAIServing):
    def __init__(self, engine: Any, state: ServingState, *, chat_template: str | None = None,
                 tool_parser: str | None = None, enable_auto_tool_choice: bool | None = None):
        super().__init__(engine, state)
        self.chat_template = load_chat_template(chat_template)
        self.tool_parser = get_tool_parser(tool_parser)
        # vLLM's --enable-auto-tool-choice; None (Python callers): on whenever there is a parser
        self.auto_tools = self.tool_parser is not None if enable_auto_tool_choice is None else enable_auto_tool_choice
        if self.auto_tools and self.tool_parser is None:
            raise ValueError("enable_auto_tool_choice needs a tool-call parser (--tool-call-parser hermes or "
                             "llama3_json)")

    def aliases_for(self, body: ChatCompletionRequest) -> dict[str, str]:
        max_tokens = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        return {"prompt": "messages", "prompt_token_ids": "messages", "max_tokens": max_tokens,
                "logprobs": "top_logprobs"}

    async def create(self, request: Request) -> Response:
        body = self.parse(await request.body(), ChatCompletionRequest)
        if body.use_beam_search:
            chat_beam_params(self, body)  # refused before the template renders
        enforced = tool_constraint(body)  # (grammar, parser) for "required" / a named function
        template_tools, parser = self._tool_mode(body, enforced)
        prompt_ids = await self.render_async(body.messages, template_tools, body.add_generation_prompt,
                                             body.chat_template_kwargs)
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = self.sampling_params(body, max_tokens=max_tokens, logprobs=logprobs)
        if enforced is not None:
            params = dataclasses.replace(params, structured_outputs=enforced[0])
        response_id = self.new_id("chatcmpl")
        if body.use_beam_search:
            return await chat_beam_search_response(self, body, prompt_ids, response_id)
        requests = await self.start(body, [prompt_ids], params, response_id)
        if body.stream:
            return stream_response(requests, lambda: self._events(body, requests, response_id, parser))
        return await unless_disconnected(request, requests,
                                         lambda: self._collect(body, requests, response_id, parser))

    # -- prompt -----------------------------------------------------------------------

    def _tool_mode(self, body: ChatCompletionRequest,
                   enforced: tuple | None = None) -> tuple[list[dict] | None, ToolParser | None]:
        """(tools shown to the template, parser of the answer)."""
        choice = body.tool_choice
        if not body.tools:
            return None, None
        if choice is None:
            choice = "auto" if self.auto_tools else "none"
        if choice == "none":
            return None, None
        tools = [t.model_dump(exclude_none=True) for t in body.tools]
        if isinstance(choice, NamedToolChoice):
            name = choice.function.name
            return [t for t in tools if t["function"]["name"] == name], enforced[1]
        if enforced is not None:  # "required"
            return tools, enforced[1]
        if not self.auto_tools:
            raise bad_request(f"tool_choice {choice!r} needs a server started with --enable-auto-tool-choice and a "
                              "tool-call parser (--tool-call-parser hermes or llama3_json)", param="tool_choice")
        return tools, self.tool_parser

    async def render_async(self, messages: list[ChatMessage], tools: list[dict] | None = None,
                           add_generation_prompt: bool = True,
                           template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """render() after the cheap size pre-check, in the worker pool (off the event loop)."""
        self.check_chars(sum(_chars(m) for m in messages), "messages")
        return await self.state.offload(self.render, messages, tools, add_generation_prompt, template_kwargs)

    def render(self, messages: list[ChatMessage], tools: list[dict] | None = None, add_generation_prompt: bool = True,
               template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """The templated prompt's token ids."""
        reserved = sorted(set(template_kwargs or ()) & _RESERVED_TEMPLATE_KWARGS)
        if reserved:
            raise bad_request(f"chat_template_kwargs may not set {', '.join(reserved)}", param="chat_template_kwargs")
        if self.chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("this model has no chat template: start the server with --chat-template FILE, "
                              "or use /v1/completions", param="messages", code="chat_template_missing")
        conversation = [self._message(m) for m in messages]
        try:
            return render_chat(self.tokenizer, conversation, chat_template=self.chat_template, tools=tools,
                               add_generation_prompt=add_generation_prompt, **(template_kwargs or {}))
        except ChatTemplateError as e:
            raise bad_request(str(e), param="messages") from None

    @staticmethod
    def _message(m: ChatMessage) -> dict[str, Any]:
        if isinstance(m.content, list):
            kinds = sorted({p.type for p in m.content} - {"text"})
            if kinds:
                raise bad_request(f"messages: only text content parts are supported, got {', '.join(kinds)}",
                                  param="messages")
            content = "".join(p.text or "" for p in m.content)
        else:
            content = m.content or ""
        out: dict[str, Any] = {"role": m.role, "content": content}
        if m.name is not None:
            out["name"] = m.name
        if m.tool_call_id is not None:
            out["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}}
                for c in m.tool_calls]
        return out

    # -- non-streaming ----------------------------------------------------------------

    async def _collect(self, body: ChatCompletionRequest, requests: EngineRequests, response_id: str,
                       parser: ToolParser | None) -> dict:
        out = None
        async for _, delta in requests:
            out = merge_delta(out, delta)
        choices = []
        max_calls = None if body.parallel_tool_calls else 1
        for c in out.outputs:
            message: dict[str, Any] = {"role": "assistant", "content": c.text}
            finish_reason = c.finish_reason
            if parser is not None:
                parsed = parser.parse(c.text, final=True)
                calls = parsed.named_calls[:max_calls]
                message = {"role": "assistant", "content": parsed.content or (None if calls else ""),
                           "tool_calls": tool_calls_json(calls)}
                if calls and finish_reason == "stop":
                    finish_reason = "tool_calls"
            choices.append({"index": c.index, "message": message, "logprobs": self._logprobs(body, c),
                            "finish_reason": finish_reason, "stop_reason": c.stop_reason})
        completion_tokens = sum(len(c.token_ids) for c in out.outputs)
        return {"id": response_id, "object": "chat.completion", "created": self.created(),
                "model": self.response_model(body), "choices": choices,
                "usage": self.usage(len(out.prompt_token_ids), completion_tokens)}

    # -- streaming --------------------------------------------------------------------

    async def _events(self, body: ChatCompletionRequest, requests: EngineRequests, response_id: str,
                      parser: ToolParser | None) -> AsyncIterator[str]:
        created = self.created()
        options = body.stream_options
        include_usage = options is not None and options.include_usage
        continuous = include_usage and options.continuous_usage_stats
        max_calls = None if body.parallel_tool_calls else 1
        streamers = {k: ToolStreamer(parser, max_calls) for k in range(body.n)} if parser is not None else {}
        prompt_tokens, completion_tokens = 0, 0

        def chunk(index: int, delta: dict, logprobs: Any = None, finish_reason: str | None = None) -> str:
            obj: dict[str, Any] = {"id": response_id, "object": "chat.completion.chunk", "created": created,
                                   "model": self.response_model(body),
                                   "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                                "finish_reason": finish_reason}]}
            if include_usage:
                obj["usage"] = self.usage(prompt_tokens, completion_tokens) if continuous else None
            return sse(obj)

        for k in range(body.n):
            yield chunk(k, {"role": "assistant", "content": ""})
        async for _, out in requests:
            prompt_tokens = len(out.prompt_token_ids)
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                final = c.finish_reason is not None
                if parser is not None:
                    deltas = streamers[c.index].feed(c.text, final)
                else:
                    deltas = [{"content": c.text}] if c.text else []
                logprobs = self._logprobs(body, c)
                finish_reason = c.finish_reason
                if finish_reason == "stop" and parser is not None and streamers[c.index].num_calls:
                    finish_reason = "tool_calls"
                if not deltas and (logprobs is not None or final):
                    deltas = [{}]
                for j, delta in enumerate(deltas):
                    last = j == len(deltas) - 1
                    yield chunk(c.index, delta, logprobs if j == 0 else None, finish_reason if last else None)
        if include_usage:
            yield sse({"id": response_id, "object": "chat.completion.chunk", "created": created,
                       "model": self.response_model(body), "choices": [],
                       "usage": self.usage(prompt_tokens, completion_tokens)})
        yield SSE_DONE

    # -- pieces -----------------------------------------------------------------------

    def _logprobs(self, body: ChatCompletionRequest, c: CompletionOutput) -> dict | None:
        if not body.logprobs or not c.logprobs:
            return None
        k = body.top_logprobs or 0
        content = []
        for token_id, entry in zip(c.token_ids, c.logprobs):
            sampled = entry.get(token_id)
            content.append({**self._token_logprob(token_id, sampled.logprob if sampled else float("-inf")),
                            "top_logprobs": [self._token_logprob(t, lp) for t, lp in self.top_logprobs(entry, k)]})
        return {"content": content}

    def _token_logprob(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token_id)
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}


def _chars(m: ChatMessage) -> int:
    """The characters of a message's text (what the pre-check counts)."""
    if isinstance(m.content, list):
        return sum(len(p.text or "") for p in m.content)
    return len(m.content or "")


def _json_or_text(arguments: str) -> Any:
    """Tool-call arguments as a dict for the template when they are a JSON object."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments
