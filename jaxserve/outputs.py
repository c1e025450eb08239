"""What the engine hands back: vLLM-shaped RequestOutput / CompletionOutput."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1-based rank among the vocabulary (None: not known)
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    """One sample of a request. In a delta (streaming) output, text / token_ids / logprobs hold
    only what is new since the previous delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None = None  # per token: sampled + top-k
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    cumulative_logprob: float | None = None  # sum of its tokens' logprobs (set for best_of > n)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # Set on the final output of a request that failed on its own (an error in processing
    # its outputs): the request is finished (finish_reason "abort"), the engine serves on.
    error: str | None = None
    # The request's metrics so far (speculative decoding counts over all its samples, see
    # engine.output_processor.spec_metrics); None when there are none.
    metrics: dict[str, float] | None = None
    # SamplingParams.prompt_logprobs: per prompt position (None at 0) the prompt token's and the
    # top tokens' logprobs; on the request's first output only (vLLM's shape).
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


def merge_delta(acc: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Accumulates streaming deltas into a cumulative RequestOutput (samples ordered by index)."""
    if acc is None:
        acc = RequestOutput(delta.request_id, delta.prompt, delta.prompt_token_ids, [], False,
                            delta.num_cached_tokens)
    by_index = {c.index: c for c in acc.outputs}
    for c in delta.outputs:
        cur = by_index.get(c.index)
        if cur is None:
            cur = by_index[c.index] = CompletionOutput(c.index, "", [], [] if c.logprobs is not None else None)
        cur.text += c.text
        cur.token_ids.extend(c.token_ids)
        if c.logprobs is not None:
            cur.logprobs = (cur.logprobs or []) + c.logprobs
        cur.finish_reason, cur.stop_reason = c.finish_reason, c.stop_reason
        if c.cumulative_logprob is not None:
            cur.cumulative_logprob = c.cumulative_logprob
    acc.outputs = [by_index[k] for k in sorted(by_index)]
    acc.finished = delta.finished
    acc.num_cached_tokens = max(acc.num_cached_tokens, delta.num_cached_tokens)
    if delta.metrics is not None:
        acc.metrics = delta.metrics
    if delta.prompt_logprobs is not None:
        acc.prompt_logprobs = delta.prompt_logprobs
    return acc
