"""Continuous-batching scheduler: which tokens of which requests run in the next step.

Each step has one token budget (max_num_batched_tokens) and a cap on sequences
(max_num_seqs). RUNNING requests go first, in admission order: one decode token each, or
the next chunk of an unfinished (chunked) prefill. Then WAITING requests are admitted FCFS
with as much of their prompt as the budget allows (chunked prefill), after a prefix-cache
lookup. When pages run out, the newest running request is preempted: its pages are freed
and it goes back to the front of the queue, to be recomputed later (its generated tokens
are kept, so the output does not change).

A request is sampled in the step that computes its last token. For n > 1, sample 0
prefills the prompt, the step samples n first tokens from its last logits, and `update`
forks samples 1..n-1, which share the prompt's pages copy-on-write.

Overlap: `schedule` runs while the previous step is still on the device, so it advances
`num_computed_tokens` itself and counts each token a step will sample as a placeholder
(`Request.num_pending`) that the next step computes (the device feeds its id forward).
`update(step N)` runs after step N+1 was scheduled: it turns placeholders into token ids,
checks stops (a request that stopped at N may have a token in N+1: it is dropped) and
forks. A request whose placeholders already reach its length limit is not scheduled again.
Requests whose pages were released (finish, abort, preemption) are reported once in the
next SchedulerOutput so that the model runner frees their device slots.

Sliding window (the KV manager has one only when every layer shares it): each step first
slides every running request's window to its next query position, so the pages no query
will see again are back in the pool before anything is allocated or preempted. A windowed
request then needs at most ceil(W / page_size) + 1 held pages beyond the pages of its chunk,
and the allocation plan counts exactly that (it only grows the table at its end).
`ScheduledSeq.num_null_pages` tells the model runner which leading block-table entries are
the null page now.
"""

from __future__ import annotations

import collections
import dataclasses

from jaxserve.core.kv_cache_manager import KVCacheManager
from jaxserve.core.request import Request, RequestStatus


@dataclasses.dataclass
class ScheduledSeq:
    request: Request
    start: int  # first token index computed this step (== num_computed_tokens before it)
    num_new_tokens: int  # tokens computed this step; those at >= len(token_ids) are placeholders
    num_samples: int  # 0: a prefill chunk that does not reach the end; 1; or n (fork group)
    num_new_pages: int  # pages this step added or replaced (copy-on-write), all at or after start's page
    num_null_pages: int = 0  # leading block-table entries that are the null page (slid out of the window)
    draft_token_ids: tuple[int, ...] = ()  # speculative proposals this step verifies (after its one known token)


@dataclasses.dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq]  # batch order: the flat token batch is their tokens, in this order
    num_tokens: int  # total tokens computed this step
    copies: list[tuple[int, int]]  # copy-on-write (src_page, dst_page), run before KV writes
    released: list[str]  # request ids whose pages were freed since the last output

    @property
    def num_sample_rows(self) -> int:
        return sum(s.num_samples for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, kv: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 long_prompt_threshold: int | None = None, lora=None, speculator=None):
        """long_prompt_threshold: prompts longer than this compute their KV differently (longrope's
        long factors, models.rope), so their pages are cached apart (salted prefix hashes).
        lora: the engine's LoRAManager (acquire(req) -> bool pins a request's adapter into a
        device slot, release(req) unpins it), or None without adapters.
        speculator: a core.spec_decode.Speculator, or None (no speculative decoding)."""
        self.speculator = speculator
        self.kv = kv
        self.long_prompt_threshold = long_prompt_threshold
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.lora = lora
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._released: list[str] = []

    # -- queue -----------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _slots(self, request: Request) -> int:
        """Sequence slots a request holds: an unforked n > 1 group reserves all n."""
        return request.params.n if request.forks_pending else 1

    # -- one step --------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        seqs: list[ScheduledSeq] = []
        preempted = False
        if self.kv.sliding_window is not None:
            for req in self.running:
                self.kv.slide_window(req.request_id, req.token_ids, req.num_computed_tokens)
        proposals = self.speculator.propose(self.running) if self.speculator is not None else {}
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n_new = min(req.num_tokens_with_pending - req.num_computed_tokens, budget)
            if n_new <= 0 or req.reaches_length_limit(self.max_model_len):
                i += 1  # its last token is already on the device: nothing left to compute
                continue
            # (one token of the budget stays reserved for each running request after this one)
            draft = self.speculator.attach(req, proposals.get(req.request_id), budget - (len(self.running) - i - 1),
                                           self.max_model_len) if proposals else ()
            n_new += len(draft)
            while (new := self._allocate(req, n_new)) is None:
                if draft:  # no pages for the proposals: verify none rather than preempt anyone
                    self.speculator.detach(req, draft)
                    n_new, draft = n_new - len(draft), ()
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break  # it preempted itself: everything after it is gone too
            seqs.append(self._scheduled(req, n_new, len(new)))
            seqs[-1].draft_token_ids = draft
            budget -= n_new
            i += 1
        if not preempted:
            budget = self._admit_waiting(seqs, budget)
        copies = self.kv.take_pending_copies()
        released, self._released = self._released, []
        return SchedulerOutput(seqs, self.max_num_batched_tokens - budget, copies, released)

    def _allocate(self, req: Request, n_new: int, computed_pages=()) -> list[int] | None:
        return self.kv.allocate_slots(req.request_id, req.token_ids, req.num_computed_tokens, n_new, computed_pages,
                                      num_pending_tokens=req.num_pending)

    def _admit_waiting(self, seqs: list[ScheduledSeq], budget: int) -> int:
        used_slots = sum(self._slots(r) for r in self.running)
        skipped: list[Request] = []  # waiting for a LoRA slot: they keep their place in the queue
        while self.waiting and budget > 0:
            req = self.waiting[0]
            if used_slots + self._slots(req) > self.max_num_seqs:
                break
            if self.lora is not None and not self.lora.acquire(req):
                skipped.append(self.waiting.popleft())
                continue
            pages, n_hit = [], 0  # prompt logprobs need every prompt position computed (as vLLM)
            if req.params.prompt_logprobs is None:
                pages, n_hit = self.kv.get_computed_pages(req.request_id, req.token_ids,
                                                          extra_key=self._prefix_key(req))
            n_new = min(req.num_tokens - n_hit, budget)
            req.num_computed_tokens = n_hit
            new = self._allocate(req, n_new, pages)
            if new is None:
                req.num_computed_tokens = 0
                if self.lora is not None:
                    self.lora.release(req)
                break
            self.waiting.popleft()
            if req.status == RequestStatus.WAITING:
                req.num_cached_prompt_tokens = n_hit
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            used_slots += self._slots(req)
            seqs.append(self._scheduled(req, n_new, len(pages) + len(new)))
            budget -= n_new
        self.waiting.extendleft(reversed(skipped))
        return budget

    def _prefix_key(self, req: Request) -> bytes | None:
        """The prefix-cache salt of a request whose prompt's KV is computed with other RoPE
        frequencies (a prompt past the longrope threshold) or under a LoRA adapter (its own pages);
        None for every other request."""
        key = b""
        if self.long_prompt_threshold is not None and req.num_prompt_tokens > self.long_prompt_threshold:
            key = b"long-prompt-rope"
        if req.lora_request is not None:
            key += req.lora_request.prefix_key
        return key or None

    def _scheduled(self, req: Request, n_new: int, num_new_pages: int) -> ScheduledSeq:
        """Records the step for the request and advances it past the step (placeholders)."""
        reaches_end = req.num_computed_tokens + n_new == req.num_tokens_with_pending
        samples = (req.params.n if req.samples_group else 1) if reaches_end else 0
        seq = ScheduledSeq(req, req.num_computed_tokens, n_new, samples, num_new_pages,
                           self.kv.num_null_pages(req.request_id))
        req.num_computed_tokens += n_new
        req.num_pending += 1 if samples else 0
        return seq

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # -- after the step ---------------------------------------------------------------

    def update(self, out: SchedulerOutput, sampled: list[tuple[int, tuple | None]],
               make_child) -> list[Request]:
        """Applies a step's results. `sampled` holds (token, logprobs) per sample row, in row
        order; `make_child(parent, sample_index)` builds a forked Request. Returns the
        requests that got a new token this step (children included); finished ones are
        already released."""
        touched: list[Request] = []
        rows = iter(sampled)
        for s in out.seqs:
            req = s.request
            if req.is_finished:  # ended (stop string, abort) while this step was computing:
                for _ in range(s.num_samples):  # its sampled tokens are dropped
                    next(rows)
                continue
            if s.draft_token_ids:  # a verified speculative step: its accepted run (core.spec_decode)
                touched.append(self.speculator.apply(self, s, next(rows)))
                continue
            computed = s.start + s.num_new_tokens
            if req.status == RequestStatus.RUNNING:  # a preempted request's pages are gone
                self.kv.cache_full_pages(req.request_id, req.token_ids, computed, extra_key=self._prefix_key(req))
            if s.num_samples == 0:
                continue
            req.num_pending -= 1
            group = [req] + [self._fork(req, k, computed, make_child) for k in range(1, s.num_samples)]
            req.forked = req.forked or s.num_samples > 1
            for member in group:
                token, logprobs = next(rows)
                member.append_token(token, logprobs)
                status = member.check_stop(self.max_model_len)
                if status is not None:
                    self.finish(member, status)
                touched.append(member)
        return touched

    def _fork(self, parent: Request, k: int, computed: int, make_child) -> Request:
        """Sample k of the parent's group: shares the prompt's pages, or, when the parent was
        preempted while the step ran, waits to recompute the prompt like a preempted request."""
        child = make_child(parent, k)
        self.requests[child.request_id] = child
        if parent.status == RequestStatus.RUNNING:
            self.kv.fork(parent.request_id, child.request_id)
            if self.lora is not None:
                self.lora.acquire(child)  # the parent's adapter: resident and pinned, so it succeeds
            child.num_computed_tokens = computed
            child.status = RequestStatus.RUNNING
            self.running.append(child)
        else:
            child.status = RequestStatus.PREEMPTED
            self.waiting.appendleft(child)
        return child

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Ends a request (stop, length or abort) and frees its pages; idempotent."""
        if req.is_finished:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._release(req)
        req.status = status
        self.requests.pop(req.request_id, None)

    def _release(self, req: Request) -> None:
        self.kv.free(req.request_id)
        if self.lora is not None:
            self.lora.release(req)
        self._released.append(req.request_id)

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is not None:
            self.finish(req, RequestStatus.FINISHED_ABORTED)
        return req
