"""Request: one sequence the engine is generating, and its lifecycle.

A prompt with SamplingParams.n > 1 enters as one Request (sample 0) that prefills the
prompt; when the prompt is done the scheduler samples n first tokens from its last logits
and forks samples 1..n-1 as child Requests that share the prompt's KV pages (copy-on-write).

With the overlapped loop the scheduler runs one step ahead of the results: a token sampled
by a step still on the device is a *placeholder* (`num_pending`), counted in the request's
length but not yet in `token_ids`; the device feeds it to the next step itself.
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
                 max_tokens: int, eos_token_ids: frozenset[int], seed: int,
                 sample_index: int = 0, parent_id: str | None = None, arrival: float | None = None,
                 lora_request=None):
        self.request_id = request_id
        self.parent_id = parent_id or request_id  # the user's request id (same for all n samples)
        self.sample_index = sample_index
        self.params = params
        self.num_prompt_tokens = len(prompt_token_ids)
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt + output, grows in place
        self.max_tokens = max_tokens
        self.eos_token_ids = eos_token_ids
        self.seed = seed  # of the whole group: each sample folds its sample_index into the key
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0  # advanced when a step is scheduled, not when it returns
        self.num_pending = 0  # tokens sampled by dispatched steps whose ids are not known yet
        self.forked = False  # sample 0 of an n > 1 group: its samples 1..n-1 exist
        self.num_cached_prompt_tokens = 0  # prefix-cache hit at first admission
        self.logprobs: list[tuple[float, list[int], list[float]]] = []  # per output token
        self.stop_reason: int | str | None = None
        self.arrival = time.monotonic() if arrival is None else arrival
        self.lora_request = lora_request  # jaxserve.lora_request.LoRARequest, or None: the base model
        self.lora_slot = 0  # its adapter's device slot while it holds one (engine.lora_manager)
        # Speculative decoding (core.spec_decode): (verification steps, proposals, accepted proposals).
        self.spec_counts = (0, 0, 0)

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
    def num_tokens_with_pending(self) -> int:
        """Known tokens plus placeholders: the length the next step's positions follow."""
        return len(self.token_ids) + self.num_pending

    @property
    def forks_pending(self) -> bool:
        """True until sample 0 of an n > 1 group has forked: it holds n sequence slots."""
        return self.sample_index == 0 and self.params.n > 1 and not self.forked

    @property
    def samples_group(self) -> bool:
        """The next sampling step of this request samples all n first tokens at once."""
        return self.forks_pending and self.num_output_tokens == 0 and self.num_pending == 0

    def reaches_length_limit(self, max_model_len: int) -> bool:
        """True when the tokens already sampled (placeholders included) end the request by
        length, so another step for it would only compute a token that is dropped."""
        return (self.num_output_tokens + self.num_pending >= self.max_tokens
                or self.num_tokens_with_pending >= max_model_len)

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

    def min_tokens_banned_ids(self) -> list[int]:
        """Token ids that get a -inf logit while min_tokens is not reached: the stop token
        ids, and EOS unless ignore_eos (the device applies the ban by the step count)."""
        if self.params.min_tokens == 0:
            return []
        banned = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            banned |= self.eos_token_ids
        return sorted(banned)
