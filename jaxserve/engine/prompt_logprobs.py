"""Host side of prompt logprobs: the per-row results of prompt-logprob steps
(worker/prompt_logprobs.py) -> each request's `RequestOutput.prompt_logprobs`.

vLLM's shape: one entry per prompt position, None at position 0 (nothing precedes it), else
{token id: Logprob} with the top `prompt_logprobs` tokens at that position (ranks 1..k) and
the prompt's own token (its true rank). The list goes out once, on the request's first
output (the step after its last prompt chunk). A request recomputed after preemption
overwrites positions with the same values; one aborted before its prompt ends is dropped.
"""

from __future__ import annotations

import numpy as np

from jaxserve.core.scheduler import SchedulerOutput
from jaxserve.outputs import Logprob, RequestOutput
from jaxserve.sampling_params import SamplingParams

PromptLogprobs = list[dict[int, Logprob] | None]


class PromptLogprobsCollector:
    def __init__(self) -> None:
        self._pending: dict[str, PromptLogprobs] = {}  # request id -> entries so far

    def add(self, request_id: str, params: SamplingParams, num_prompt_tokens: int) -> None:
        if params.prompt_logprobs is not None:
            self._pending[request_id] = [None] * num_prompt_tokens

    def drop(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    def record(self, out: SchedulerOutput, arrays: tuple[np.ndarray, ...]) -> None:
        """arrays: (target logprobs [T], target ranks [T], top ids [T, K], top logprobs [T, K])
        of the step `out`, per flat row."""
        target_lp, target_rank, top_ids, top_lp = arrays
        row = 0
        for s in out.seqs:
            req = s.request
            entries = self._pending.get(req.request_id)
            if entries is not None:
                k = req.params.prompt_logprobs
                end = min(s.start + s.num_new_tokens, req.num_prompt_tokens - 1)
                for p in range(s.start, end):  # row of position p scores prompt token p + 1
                    i = row + p - s.start
                    entry = {int(t): Logprob(float(lp), rank=j + 1)
                             for j, (t, lp) in enumerate(zip(top_ids[i, :k], top_lp[i, :k]))}
                    entry.setdefault(req.token_ids[p + 1], Logprob(float(target_lp[i]), rank=int(target_rank[i])))
                    entries[p + 1] = entry
            row += s.num_new_tokens

    def attach(self, outputs: list[RequestOutput]) -> None:
        """Puts each pending list on its request's first output (and forgets it)."""
        for out in outputs:
            entries = self._pending.pop(out.request_id, None)
            if entries is not None:
                out.prompt_logprobs = entries
