"""Output processing: the tokens a step appended -> per-sample text deltas -> RequestOutputs.

One group per user request (its n samples share the prompt); one IncrementalDetokenizer per
sample. A stop string ends the sample here, after the scheduler already scheduled its next
step: that step's token is dropped when it comes back (Scheduler.update skips finished
requests), so the output is exactly what a synchronous loop gives.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from jaxserve.core.request import Request, RequestStatus
from jaxserve.engine.detokenizer import IncrementalDetokenizer
from jaxserve.outputs import CompletionOutput, Logprob, RequestOutput
from jaxserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


def spec_metrics(counts: dict[int, tuple[int, int, int]]) -> dict[str, float] | None:
    """Speculative decoding counts of a request (sample index -> Request.spec_counts, summed
    over its samples), None when it never verified proposals:
    verification steps, proposals, accepted proposals, acceptance rate (accepted / proposed) and
    mean acceptance length (tokens per verification step, the bonus token included: vLLM's)."""
    drafts, proposed, accepted = (sum(c[i] for c in counts.values()) for i in range(3))
    if not drafts:
        return None
    return {"spec_num_drafts": drafts, "spec_num_draft_tokens": proposed, "spec_num_accepted_tokens": accepted,
            "spec_acceptance_rate": accepted / proposed, "spec_mean_acceptance_length": 1 + accepted / drafts}


def child_request_id(parent_id: str, k: int) -> str:
    """Request id of sample k >= 1 of an n > 1 request."""
    return f"{parent_id}#{k}"


@dataclasses.dataclass
class _Group:
    """One user request: n samples sharing a prompt."""

    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizers: dict[int, IncrementalDetokenizer]
    num_finished: int = 0
    spec_counts: dict[int, tuple[int, int, int]] = dataclasses.field(default_factory=dict)  # per sample

    @property
    def finished(self) -> bool:
        return self.num_finished == self.params.n


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.groups: dict[str, _Group] = {}

    def add(self, request_id: str, prompt: str | None, ids: list[int], params: SamplingParams) -> None:
        self.groups[request_id] = _Group(prompt, ids, params, {0: self._detokenizer(ids, params)})

    def make_child(self, parent: Request, k: int) -> Request:
        """Sample k of the parent's group (the scheduler forks it after the first token)."""
        group = self.groups[parent.request_id]
        group.detokenizers[k] = self._detokenizer(parent.prompt_token_ids, parent.params)
        return Request(child_request_id(parent.request_id, k), parent.prompt_token_ids, parent.params,
                       max_tokens=parent.max_tokens, eos_token_ids=parent.eos_token_ids, seed=parent.seed,
                       sample_index=k, parent_id=parent.request_id, arrival=parent.arrival,
                       lora_request=parent.lora_request)

    def abort(self, request_id: str) -> _Group | None:
        return self.groups.pop(request_id, None)

    def _detokenizer(self, ids: list[int], params: SamplingParams) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens,
                                      stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output,
                                      min_tokens=params.min_tokens)

    def process(self, touched: list[Request], finish: Callable[[Request, RequestStatus], None],
                abort_samples: Callable[[str, int], None] | None = None) -> list[RequestOutput]:
        """One delta per sample that got a token (in order); `finish` ends a sample whose
        text hit a stop string. A sample whose delta raises fails its whole request:
        `abort_samples(request_id, n)` ends all n samples in the scheduler (default: just
        this one, via `finish`) and the request's last output carries the error."""
        outputs = []
        for req in touched:
            if req.parent_id not in self.groups:  # finished, aborted or failed already
                continue
            try:
                outputs.append(self._output(req, finish))
            except Exception as e:  # noqa: BLE001 - traced to this request: fail it alone
                outputs.append(self._fail(req, e, finish, abort_samples))
        return outputs

    def _fail(self, req: Request, error: Exception, finish, abort_samples) -> RequestOutput:
        log.exception("output processing failed for request %r; finishing it with an error", req.parent_id)
        group = self.groups.pop(req.parent_id, None)  # None: it failed after its last delta
        n = req.params.n
        if abort_samples is not None:
            abort_samples(req.parent_id, n)
        else:
            finish(req, RequestStatus.FINISHED_ABORTED)
        message = f"request {req.parent_id!r} failed in output processing: {type(error).__name__}: {error}"
        completions = [CompletionOutput(k, "", [], None, "abort") for k in range(n)]
        return RequestOutput(req.parent_id, group.prompt if group else None,
                             group.prompt_token_ids if group else [], completions, True,
                             req.num_cached_prompt_tokens, error=message)

    def _output(self, req: Request, finish) -> RequestOutput:
        group = self.groups[req.parent_id]
        detok = group.detokenizers[req.sample_index]
        # The tokens since the last delta: one, or a speculative step's accepted run.
        new = req.output_token_ids[len(detok.token_ids):]
        # The EOS or stop token that ended the request is not part of the text (as vLLM).
        ended_by_token = req.is_finished and req.status == RequestStatus.FINISHED_STOPPED
        before = len(detok.token_ids)
        text = detok.append(new[:-1] if ended_by_token else new)
        dropped = len(new) - (len(detok.token_ids) - before)  # tokens after the one that completed a stop string
        if detok.stop_reason is not None and (dropped or not req.is_finished):
            if dropped:  # a stop string ended inside a speculative run: its later tokens never were
                del req.token_ids[-dropped:]
                new = new[:-dropped]
                if req.params.logprobs is not None:
                    del req.logprobs[-dropped:]
            req.stop_reason = detok.stop_reason
            if req.is_finished:  # by a later token of the run (length, EOS, stop token): the string came first
                req.status = RequestStatus.FINISHED_STOPPED
            else:
                finish(req, RequestStatus.FINISHED_STOPPED)
        if req.is_finished:
            text += detok.flush()
            group.num_finished += 1
        logprobs = None
        if req.params.logprobs is not None and req.logprobs:
            logprobs = []
            for token, (sampled_lp, ids, lps) in zip(new, req.logprobs[-len(new):]):
                entry = {i: Logprob(lp, rank=r + 1) for r, (i, lp) in enumerate(zip(ids, lps))}
                entry.setdefault(token, Logprob(sampled_lp))
                logprobs.append(entry)
        if req.spec_counts[0]:
            group.spec_counts[req.sample_index] = req.spec_counts
        completion = CompletionOutput(req.sample_index, text, list(new), logprobs, req.status.finish_reason,
                                      req.stop_reason)
        if group.finished:
            del self.groups[req.parent_id]
        return RequestOutput(req.parent_id, group.prompt, group.prompt_token_ids, [completion], group.finished,
                             req.num_cached_prompt_tokens, metrics=spec_metrics(group.spec_counts))
