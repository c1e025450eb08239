"""Request: one sequence the engine is generating, and its lifecycle.

A prompt with SamplingParams.n > 1 enters as one Request (sample 0) that prefills the
prompt; when the prompt is done the scheduler samples n first tokens from its last logits
and forks samples 1..n-1 as child Requests that share the prompt's KV pages (copy-on-write).
"""

from __future__ import annotations

import enum
import time

from jaxserve.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Ordered: everything above PREEMPTED is finished."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                RequestStatus.FINISHED_ABORTED: "abort"}.get(self)


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                 max_tokens: int, eos_token_ids: frozenset[int], seeds: list[int],
                 sample_index: int = 0, parent_id: str | None = None, arrival: float | None = None):
        self.request_id = request_id
        self.parent_id = parent_id or request_id  # the user's request id (same for all n samples)
        self.sample_index = sample_index
        self.params = params
        self.num_prompt_tokens = len(prompt_token_ids)
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt + output, grows in place
        self.max_tokens = max_tokens
        self.eos_token_ids = eos_token_ids
        self.seeds = seeds  # one per sample of the group; this request uses seeds[sample_index]
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_prompt_tokens = 0  # prefix-cache hit at first admission
        self.logprobs: list[tuple[float, list[int], list[float]]] = []  # per output token
        self.stop_reason: int | str | None = None
        self.arrival = time.monotonic() if arrival is None else arrival

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def seed(self) -> int:
        return self.seeds[self.sample_index]

    @property
    def forks_pending(self) -> bool:
        """True until sample 0 of an n > 1 group has produced its first token and forked."""
        return self.sample_index == 0 and self.params.n > 1 and self.num_output_tokens == 0

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_token(self, token: int, logprobs: tuple[float, list[int], list[float]] | None) -> None:
        self.token_ids.append(token)
        if logprobs is not None:
            self.logprobs.append(logprobs)

    def check_stop(self, max_model_len: int) -> RequestStatus | None:
        """Stop conditions decided by token ids (stop strings are the detokenizer's)."""
        n = self.num_output_tokens
        last = self.token_ids[-1]
        if n >= self.params.min_tokens:
            if last in self.params.stop_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
            if not self.params.ignore_eos and last in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if n >= self.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def banned_tokens(self) -> dict[int, float] | None:
        """While min_tokens is not reached, EOS and stop token ids get a -inf logit bias."""
        if self.num_output_tokens >= self.params.min_tokens:
            return None
        banned = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            banned |= self.eos_token_ids
        return {t: float("-inf") for t in banned} or None
