"""best_of > n (vLLM's semantics): a request samples best_of completions and returns the n
with the highest cumulative logprob.

The engine runs the request as an ordinary n = best_of group whose every token carries its
sampled logprob (logprobs=0 at least; the device computes it in the sampler it runs anyway).
Its deltas are held here until all best_of samples finished, then one RequestOutput goes out:
the n best completions, best first, numbered 0..n-1, each with its `cumulative_logprob`, and
the logprobs only if the user asked for them. A stream therefore gets its text at the end.
"""

from __future__ import annotations

import dataclasses

from jaxserve.outputs import CompletionOutput, RequestOutput, merge_delta
from jaxserve.sampling_params import SamplingParams


def engine_params(params: SamplingParams) -> SamplingParams:
    """The params the engine runs: n = best_of with sampled logprobs, or `params` itself."""
    if not isinstance(params, SamplingParams) or params.best_of is None or params.best_of == params.n:
        return params
    return dataclasses.replace(params, n=params.best_of, best_of=None,
                               logprobs=params.logprobs if params.logprobs is not None else 0)


def cumulative_logprob(c: CompletionOutput) -> float:
    return sum(entry[t].logprob for t, entry in zip(c.token_ids, c.logprobs or []) if t in entry)


class BestOf:
    def __init__(self) -> None:
        self._held: dict[str, tuple[SamplingParams, RequestOutput | None]] = {}  # request id -> (user params, so far)

    def add(self, request_id: str, params: SamplingParams) -> None:
        self._held[request_id] = (params, None)

    def drop(self, request_id: str) -> None:
        self._held.pop(request_id, None)

    def filter(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Passes other requests' deltas through; holds best_of ones until they finish."""
        kept = []
        for out in outputs:
            held = self._held.get(out.request_id)
            if held is None:
                kept.append(out)
                continue
            params, acc = held
            error = out.error or (acc.error if acc is not None else None)
            acc = merge_delta(acc, out)
            acc.error = error
            if not acc.finished:
                self._held[out.request_id] = (params, acc)
                continue
            del self._held[out.request_id]
            kept.append(self._best(acc, params))
        return kept

    @staticmethod
    def _best(acc: RequestOutput, params: SamplingParams) -> RequestOutput:
        ranked = sorted(acc.outputs, key=lambda c: (-cumulative_logprob(c), c.index))[:params.n]
        acc.outputs = [dataclasses.replace(c, index=k, cumulative_logprob=cumulative_logprob(c),
                                           logprobs=c.logprobs if params.logprobs is not None else None)
                       for k, c in enumerate(ranked)]
        return acc
