"""Conversions between the jaxserve.v1 protobuf messages and the engine's Python types.

The server reads a GenerateRequest into (prompt, SamplingParams) and writes RequestOutput
deltas as Completion messages; the client does the reverse, so that `Client.generate`
returns the same RequestOutput that `LLM.generate` does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxserve.outputs import CompletionOutput, Logprob, RequestOutput
from jaxserve.protos.v1 import generate_pb2 as pb
from jaxserve.sampling_params import SamplingParams, StructuredOutputsParams

# SamplingParams fields that are proto3 `optional` scalars: unset means the Python default.
SCALAR_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "seed", "max_tokens", "min_tokens", "ignore_eos", "logprobs",
                 "skip_special_tokens", "include_stop_str_in_output", "prompt_logprobs", "best_of")

FINISH_REASONS = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP,
                  "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
_FINISH_NAMES = {v: k for k, v in FINISH_REASONS.items()}


# -- server side: request in, outputs out -----------------------------------------------

def params_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """SamplingParams from the message; raises ValueError naming the field."""
    kwargs: dict[str, Any] = {name: getattr(msg, name) for name in SCALAR_FIELDS if msg.HasField(name)}
    if kwargs.get("max_tokens") == 0:
        kwargs["max_tokens"] = None  # 0: up to the context length
    if msg.stop:
        kwargs["stop"] = list(msg.stop)
    if msg.stop_token_ids:
        kwargs["stop_token_ids"] = list(msg.stop_token_ids)
    if msg.logit_bias:
        kwargs["logit_bias"] = dict(msg.logit_bias)
    if msg.HasField("structured_outputs"):
        kwargs["structured_outputs"] = structured_from_proto(msg.structured_outputs)
    return SamplingParams(**kwargs)


def structured_from_proto(msg: pb.StructuredOutputs) -> StructuredOutputsParams:
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise ValueError("structured_outputs must set exactly one of json, regex, choice, grammar, json_object, "
                         "got none")
    value = list(msg.choice.choices) if kind == "choice" else getattr(msg, kind)
    kwargs: dict[str, Any] = {kind: value}
    if msg.HasField("disable_any_whitespace"):
        kwargs["disable_any_whitespace"] = msg.disable_any_whitespace
    return StructuredOutputsParams(**kwargs)


def structured_to_proto(so: StructuredOutputsParams) -> pb.StructuredOutputs:
    msg = pb.StructuredOutputs(disable_any_whitespace=so.disable_any_whitespace)
    if so.kind == "choice":
        msg.choice.choices.extend(so.choice)
    else:
        setattr(msg, so.kind, True if so.kind == "json_object" else getattr(so, so.kind))
    return msg


def request_from_proto(msg: pb.GenerateRequest) -> tuple[str | list[int], SamplingParams]:
    """(prompt, params) of a GenerateRequest; raises ValueError naming the field."""
    if "#" in msg.request_id:
        raise ValueError(f"request_id must not contain '#', got {msg.request_id!r}")
    if msg.text and msg.token_ids:
        raise ValueError("prompt: set exactly one of text and token_ids, got both")
    if not msg.text and not msg.token_ids:
        raise ValueError("prompt: set exactly one of text and token_ids, got neither (prompt must not be empty)")
    prompt = msg.text if msg.text else list(msg.token_ids)
    return prompt, params_from_proto(msg.sampling_params)


def token_logprobs_to_proto(token_ids: list[int], logprobs: list[dict[int, Logprob]]) -> list[pb.TokenLogprobs]:
    out = []
    for token, entry in zip(token_ids, logprobs):
        sampled = entry.get(token)
        top = sorted(((tid, lp) for tid, lp in entry.items() if lp.rank is not None), key=lambda t: t[1].rank)
        msg = pb.TokenLogprobs(token_id=token, logprob=sampled.logprob if sampled else 0.0,
                               top_logprobs=[pb.TopLogprob(token_id=t, logprob=lp.logprob, rank=lp.rank)
                                             for t, lp in top])
        if sampled is not None and sampled.rank is not None:
            msg.rank = sampled.rank
        out.append(msg)
    return out


def prompt_logprobs_to_proto(out: RequestOutput) -> list[pb.TokenLogprobs]:
    """RequestOutput.prompt_logprobs (None first) -> one TokenLogprobs per later prompt token."""
    if out.prompt_logprobs is None:
        return []
    return token_logprobs_to_proto(out.prompt_token_ids[1:], out.prompt_logprobs[1:])


def prompt_logprobs_from_proto(msgs, prompt_token_ids: list[int]) -> list | None:
    if not msgs:
        return None
    return [None] + [_entry(t) for t in msgs]


def _entry(t: pb.TokenLogprobs) -> dict[int, Logprob]:
    entry = {top.token_id: Logprob(top.logprob, rank=top.rank) for top in t.top_logprobs}
    entry.setdefault(t.token_id, Logprob(t.logprob, rank=t.rank if t.HasField("rank") else None))
    return entry


def completion_to_proto(c: CompletionOutput) -> pb.Completion:
    msg = pb.Completion(index=c.index, text=c.text, token_ids=c.token_ids,
                        finish_reason=FINISH_REASONS.get(c.finish_reason, pb.FINISH_REASON_UNSPECIFIED))
    if c.logprobs:
        msg.logprobs.extend(token_logprobs_to_proto(c.token_ids, c.logprobs))
    if isinstance(c.stop_reason, str):
        msg.stop_string = c.stop_reason
    elif isinstance(c.stop_reason, int):
        msg.stop_token_id = c.stop_reason
    return msg


@dataclasses.dataclass
class UsageCounter:
    """Token counts of one request, accumulated over its deltas."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0

    def add(self, delta: RequestOutput) -> None:
        self.prompt_tokens = len(delta.prompt_token_ids)
        self.completion_tokens += sum(len(c.token_ids) for c in delta.outputs)
        self.cached_prompt_tokens = max(self.cached_prompt_tokens, delta.num_cached_tokens)

    def to_proto(self) -> pb.Usage:
        return pb.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                        cached_prompt_tokens=self.cached_prompt_tokens)


# -- client side: params out, outputs in -------------------------------------------------

def params_to_proto(params: SamplingParams) -> pb.SamplingParams:
    """Sets only the fields that differ from the defaults, so the server's defaults apply."""
    default = SamplingParams()
    msg = pb.SamplingParams()
    for name in SCALAR_FIELDS:
        value = getattr(params, name)
        if value != getattr(default, name):
            setattr(msg, name, 0 if name == "max_tokens" and value is None else value)
    msg.stop.extend(params.stop)
    msg.stop_token_ids.extend(params.stop_token_ids)
    for tid, bias in params.logit_bias or ():
        msg.logit_bias[tid] = bias
    if params.structured_outputs is not None:
        msg.structured_outputs.CopyFrom(structured_to_proto(params.structured_outputs))
    return msg


def request_to_proto(prompt: str | list[int], params: SamplingParams | None,
                     request_id: str = "", lora_name: str = "") -> pb.GenerateRequest:
    msg = pb.GenerateRequest(request_id=request_id or "", lora_name=lora_name or "",
                             sampling_params=params_to_proto(params or SamplingParams()))
    if isinstance(prompt, str):
        msg.text = prompt
    else:
        msg.token_ids.extend(int(t) for t in prompt)
    return msg


def completion_from_proto(msg: pb.Completion) -> CompletionOutput:
    logprobs = [_entry(t) for t in msg.logprobs] if msg.logprobs else None
    which = msg.WhichOneof("stop_reason")
    return CompletionOutput(msg.index, msg.text, list(msg.token_ids), logprobs,
                            _FINISH_NAMES.get(msg.finish_reason), getattr(msg, which) if which else None)


def stream_delta_from_proto(msg: pb.GenerateStreamResponse, prompt_token_ids: list[int]) -> RequestOutput:
    return RequestOutput(msg.request_id, None, prompt_token_ids, [completion_from_proto(msg.delta)], msg.finished,
                         msg.usage.cached_prompt_tokens if msg.HasField("usage") else 0,
                         prompt_logprobs=prompt_logprobs_from_proto(msg.prompt_logprobs, prompt_token_ids))


def response_from_proto(msg: pb.GenerateResponse, prompt: str | None = None) -> RequestOutput:
    return RequestOutput(msg.request_id, prompt, list(msg.prompt_token_ids),
                         [completion_from_proto(c) for c in msg.completions], True, msg.usage.cached_prompt_tokens,
                         prompt_logprobs=prompt_logprobs_from_proto(msg.prompt_logprobs, list(msg.prompt_token_ids)))
