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
