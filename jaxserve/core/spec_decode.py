"""Speculative decoding on the host: which sequences speculate, with which proposals, and how
a verified step's accepted run goes back into the scheduler.

One step of a speculating sequence (the engine runs speculation with the synchronous loop:
proposals need the tokens of the step before):

    schedule   Speculator.propose(running)        n-gram proposals of every eligible sequence
                                                  at once (core.spec_ngram, numpy); draft_model:
                                                  K placeholders each, the draft proposes on
                                                  the device (worker.spec_draft)
               attach(req, proposal, budget)      k <= K proposals that fit the token budget,
                                                  max_tokens and max_model_len; they count
                                                  as placeholders (num_pending), so the step
                                                  computes 1 + k tokens: the last sampled
                                                  token and the proposals, like a prefill chunk
               (pages for 1 + k tokens; if the pool is short the proposals are dropped:
                speculation never preempts a request)
    device     [draft: propose(G), draft body] body(T), verify(G): acceptance (worker.spec_decode)
    update     apply(scheduler, seq, run)         the emitted run (accepted proposals + the
                                                  bonus token) is appended token by token with
                                                  the stop checks (EOS, stop tokens, max_tokens)
                                                  after each, the run cut at the first stop;
                                                  num_computed_tokens rolls back past the
                                                  rejected proposals, their trailing pages go
                                                  back to the pool (KVCacheManager.truncate)
                                                  and only pages of computed, accepted tokens
                                                  are registered in the prefix cache

Who speculates (this version): a RUNNING sequence with exactly one token to compute (its last
sampled or last prompt token), not an unforked n > 1 group, without structured outputs (its
grammar would have to advance through each proposal on the host). Greedy and sampled rows
(temperature, top-k, top-p, min-p, seeds), logit bias, min_tokens, logprobs and repetition /
presence / frequency penalties (row j counts the proposals before it, worker.spec_decode) all
speculate. Everything else decodes one token per step in the same verification program.
"""

from __future__ import annotations

import numpy as np

from jaxserve.core.request import Request, RequestStatus
from jaxserve.core.spec_ngram import pad_sequences, propose_ngram
from jaxserve.speculative import SpeculativeConfig


def draft_placeholders(k: int) -> tuple[int, ...]:
    """Host token ids of k proposals a draft model makes on the device: -2 - j is proposal j of
    the token's slot (worker.spec_draft fills them in)."""
    return tuple(-2 - j for j in range(k))


def can_speculate(req: Request) -> bool:
    """True for a sequence whose next step may verify proposals (see the module docstring)."""
    p = req.params
    return (req.status == RequestStatus.RUNNING and req.num_pending == 0
            and req.num_computed_tokens == req.num_tokens - 1 and not req.samples_group
            and p.structured_outputs is None)


class Speculator:
    """Proposals (n-gram prompt lookup on the host, or placeholders for a draft model's proposals
    made on the device) and the bookkeeping of verified steps, with totals for stats."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self.k = config.num_speculative_tokens
        self.num_drafts = 0  # verification steps of speculating sequences
        self.num_draft_tokens = 0  # proposals verified
        self.num_accepted_tokens = 0  # proposals accepted

    def propose(self, running: list[Request]) -> dict[str, np.ndarray]:
        """request id -> its proposals (1..K tokens) for every eligible sequence with a match
        (draft_model: K placeholders for every eligible sequence, filled on the device)."""
        eligible = [r for r in running if can_speculate(r)]
        if not eligible:
            return {}
        if self.config.method == "draft_model":
            placeholders = np.asarray(draft_placeholders(self.k), np.int32)
            return {r.request_id: placeholders for r in eligible}
        tokens, lens = pad_sequences([r.token_ids for r in eligible])
        c = self.config
        props, num = propose_ngram(tokens, lens, k=self.k, n_min=c.prompt_lookup_min, n_max=c.prompt_lookup_max,
                                   wrap=True)
        return {r.request_id: props[i, :num[i]] for i, r in enumerate(eligible) if num[i]}

    def attach(self, req: Request, proposal: np.ndarray | None, budget: int, max_model_len: int) -> tuple[int, ...]:
        """The proposals this step verifies for `req` (possibly none), counted as placeholders.
        budget: tokens left in the step, the sequence's own token included."""
        if proposal is None or not can_speculate(req):
            return ()
        k = min(len(proposal), budget - 1, req.max_tokens - req.num_output_tokens - 1,
                max_model_len - req.num_tokens - 1)
        if k <= 0:
            return ()
        req.num_pending += k
        return tuple(int(t) for t in proposal[:k])

    @staticmethod
    def detach(req: Request, draft: tuple[int, ...]) -> None:
        """Undoes `attach` (the step could not get pages for the proposals)."""
        req.num_pending -= len(draft)

    def apply(self, sched, s, run: list[tuple[int, tuple | None]]) -> Request:
        """Applies a verified step of one speculating sequence `s` (a ScheduledSeq): `run` holds
        the accepted proposals and the bonus token, each (token, logprobs)."""
        req = s.request
        k = len(s.draft_token_ids)
        req.num_pending -= k + 1
        accepted = len(run) - 1
        self.num_drafts += 1
        self.num_draft_tokens += k
        self.num_accepted_tokens += accepted
        req.spec_counts = tuple(a + b for a, b in zip(req.spec_counts, (1, k, accepted)))
        status = None
        m = 0
        for token, logprobs in run:
            req.append_token(token, logprobs)
            m += 1
            status = req.check_stop(sched.max_model_len)
            if status is not None:
                break
        # Inputs 0..accepted of the chunk (the last token and the accepted proposals) hold
        # correct KV; the rejected ones' slots are reused from here on.
        computed = s.start + min(accepted + 1, m)
        if req.status == RequestStatus.RUNNING:
            sched.kv.cache_full_pages(req.request_id, req.token_ids, computed, extra_key=sched._prefix_key(req))
            req.num_computed_tokens = computed
            sched.kv.truncate(req.request_id, computed)
        if status is not None:
            sched.finish(req, status)
        return req
