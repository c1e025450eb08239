"""Beam search, driven from the host over the ordinary engine (as vLLM's LLM.beam_search).

Each step, every running beam of every prompt is one engine request: the prompt plus the
beam's tokens, max_tokens=1, greedy, with `logprobs` = the candidates a beam may add. The
prefix cache makes the prefix the beams share free (their full pages are hits; only the
partial last page and the new token are computed), so a step costs about one decode token
per beam plus less than a page. The engine and its compiled programs are untouched: beam
search adds no device program and compiles nothing.

The scoring is transformers' `generate(num_beams=k, do_sample=False)` (`_beam_search` in
generation/utils.py), step for step, so both return the same beams and scores:

    candidates    the top beams_to_keep = max(2, 1 + #EOS) * k continuations over all running
                  beams by cumulative logprob (at the first step only beam 0 runs)
    finishing     a candidate among the top k whose token is EOS, or that reaches max_tokens,
                  enters the k finished slots with score cum_logprob / generated_len **
                  length_penalty (generated_len counts the EOS), unless the search can no
                  longer improve (below) or, with early_stopping=True, all k slots are full
    running       the best k candidates that did not finish
    stop          early_stopping=True: when k beams finished; False: when the best running
                  beam, scored at its current length, cannot beat the worst finished one;
                  "never": the same, at max length when length_penalty > 0; always when every
                  candidate finished (max_tokens)

The output lists the finished beams best first: BeamSearchOutput(sequences), each a
BeamSearchSequence (vLLM's names) with the prompt and generated tokens, their logprobs, the
cumulative logprob and the length-penalised score.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jaxserve.outputs import Logprob
from jaxserve.sampling_params import MAX_LOGPROBS, SamplingParams, _as_bool, _as_float, _as_int, _fail

NEG = -1.0e9  # transformers' score of an empty or masked slot


@dataclasses.dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's BeamSearchParams, plus transformers' early_stopping (True | False | "never")."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("beam_width", _as_int("beam_width", self.beam_width))
        set_("max_tokens", _as_int("max_tokens", self.max_tokens))
        for name in ("ignore_eos", "include_stop_str_in_output"):
            set_(name, _as_bool(name, getattr(self, name)))
        for name in ("temperature", "length_penalty"):
            set_(name, _as_float(name, getattr(self, name)))
        if not 1 <= self.beam_width <= MAX_LOGPROBS // 2:
            raise _fail("beam_width", f"in [1, {MAX_LOGPROBS // 2}]", self.beam_width)
        if self.max_tokens < 1:
            raise _fail("max_tokens", ">= 1", self.max_tokens)
        if self.temperature != 0.0:
            raise _fail("temperature", "0 for beam search (beams are scored by raw logprobs)", self.temperature)
        if not (self.early_stopping is True or self.early_stopping is False or self.early_stopping == "never"):
            raise _fail("early_stopping", 'true, false or "never"', self.early_stopping)


@dataclasses.dataclass
class BeamSearchSequence:
    """One beam: prompt + generated tokens (vLLM's fields, plus the score it is ranked by)."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]  # per generated token: its top candidates
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (EOS) | "length"
    stop_reason: int | None = None
    score: float = 0.0  # cum_logprob / generated_len ** length_penalty (transformers' sequences_scores)


@dataclasses.dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first


@dataclasses.dataclass
class _Beam:
    tokens: list[int]  # generated
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float


class BeamSearch:
    """The search of one prompt. `pending()` names the sequences to score next; `advance`
    takes each one's top candidates [(token, logprob)], best first."""

    def __init__(self, prompt_ids: Sequence[int], params: BeamSearchParams, eos_token_ids: frozenset[int],
                 max_tokens: int):
        self.prompt = list(prompt_ids)
        self.params = params
        self.eos = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        self.max_tokens = max_tokens
        k = params.beam_width
        self.beams_to_keep = max(2, 1 + len(self.eos)) * k
        self.running = [_Beam([], [], 0.0)]  # transformers' beams 1..k-1 start at -1e9: never chosen
        self.finished: list[tuple[float, _Beam, bool]] = []  # (score, beam, by EOS), best first, <= k
        self.improvable = True
        self.done = False

    def pending(self) -> list[list[int]]:
        return [] if self.done else [self.prompt + b.tokens for b in self.running]

    def advance(self, tops: Sequence[Sequence[tuple[int, float]]]) -> None:
        k, lp = self.params.beam_width, self.params.length_penalty
        cands = [(b.cum_logprob + logprob, i, tok, top) for i, (b, top) in enumerate(zip(self.running, tops))
                 for tok, logprob in top[:self.beams_to_keep]]
        cands.sort(key=lambda c: -c[0])
        cands = cands[:self.beams_to_keep]
        length = len(self.running[0].tokens) + 1  # generated tokens after this step
        at_limit = length >= self.max_tokens
        hits = [at_limit or tok in self.eos for _, _, tok, _ in cands]
        new = [self._extend(i, tok, top, score) for score, i, tok, top in cands]
        full = len(self.finished) == k and self.params.early_stopping is True
        if self.improvable and not full:
            fresh = [(score / length ** lp, beam, tok in self.eos)
                     for (score, _, tok, _), beam, hit in zip(cands[:k], new[:k], hits[:k]) if hit]
            self.finished = sorted(self.finished + fresh, key=lambda f: -f[0])[:k]
        self.running = [b for b, hit in zip(new, hits) if not hit][:k]
        if not self.running or all(hits):
            self.done = True
            return
        best = length if not (self.params.early_stopping == "never" and lp > 0.0) else self.max_tokens
        if len(self.finished) == k:
            self.improvable = self.running[0].cum_logprob / best ** lp > self.finished[-1][0]
        self.done = not self.improvable or (len(self.finished) == k and self.params.early_stopping is True)

    def _extend(self, i: int, token: int, top: Sequence[tuple[int, float]], score: float) -> _Beam:
        beam = self.running[i]
        entry = {t: Logprob(v, rank=r + 1) for r, (t, v) in enumerate(top)}
        return _Beam(beam.tokens + [token], beam.logprobs + [entry], score)

    def output(self, tokenizer, skip_special_tokens: bool = True) -> BeamSearchOutput:
        seqs = []
        for score, beam, by_eos in self.finished:
            shown = beam.tokens[:-1] if by_eos and not self.params.include_stop_str_in_output else beam.tokens
            text = tokenizer.decode(shown, skip_special_tokens=skip_special_tokens) if tokenizer else None
            seqs.append(BeamSearchSequence(self.prompt + beam.tokens, beam.logprobs, beam.cum_logprob, text,
                                           "stop" if by_eos else "length", beam.tokens[-1] if by_eos else None,
                                           score))
        return BeamSearchOutput(seqs)


def step_params(search: BeamSearch) -> SamplingParams:
    """The engine request that scores one beam: its next-token top candidates."""
    return SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=search.beams_to_keep)


def top_candidates(entry: dict[int, Logprob]) -> list[tuple[int, float]]:
    """A sampled token's logprob entry -> its ranked top candidates, best first."""
    ranked = sorted((lp.rank, t, lp.logprob) for t, lp in entry.items() if lp.rank is not None)
    return [(t, v) for _, t, v in ranked]


def check_beam_width(params: BeamSearchParams, eos_token_ids: frozenset[int], max_logprobs: int) -> None:
    """The candidates a step needs per beam must fit the engine's top logprobs."""
    need = max(2, 1 + (0 if params.ignore_eos else len(eos_token_ids))) * params.beam_width
    if need > max_logprobs:
        raise ValueError(f"beam_width {params.beam_width} needs {need} candidates per beam, more than the "
                         f"engine's max_logprobs ({max_logprobs}); lower beam_width")


def as_prompt(prompt: Any) -> str | list[int]:
    """vLLM's prompt forms: a string, token ids, {"prompt": str} or {"prompt_token_ids": [...]}."""
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"]
        raise ValueError(f"prompt dicts need 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
    return prompt if isinstance(prompt, str) else list(prompt)


# -- drivers ----------------------------------------------------------------------------


def _searches(engine, prompts: Sequence[Any], params: BeamSearchParams) -> list[BeamSearch]:
    check_beam_width(params, engine.eos_token_ids, engine.config.max_logprobs)
    out = []
    for prompt in prompts:
        prompt = as_prompt(prompt)
        ids = list(engine.tokenizer(prompt)["input_ids"]) if isinstance(prompt, str) else prompt
        room = engine.max_model_len - len(ids)
        if room < 1:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {engine.max_model_len}, so at most "
                             f"{engine.max_model_len - 1} prompt tokens leave room for one generated token")
        out.append(BeamSearch(ids, params, engine.eos_token_ids, min(params.max_tokens, room)))
    return out


def _advance(search: BeamSearch, outs: Sequence[Any]) -> None:
    search.advance([top_candidates(o.outputs[0].logprobs[0]) for o in outs])


def beam_search(llm, prompts: Sequence[Any], params: BeamSearchParams,
                use_tqdm: bool = False) -> list[BeamSearchOutput]:
    """LLM.beam_search: every prompt's search advances one token per round; a round is one
    LLM.generate over all running beams of all prompts."""
    if isinstance(prompts, (str, dict)) or (prompts and all(isinstance(t, int) for t in prompts)):
        prompts = [prompts]  # one prompt
    searches = _searches(llm.engine, prompts, params)
    while any(not s.done for s in searches):
        live = [s for s in searches if not s.done]
        seqs = [(s, seq) for s in live for seq in s.pending()]
        outs = llm.generate([seq for _, seq in seqs], [step_params(s) for s, _ in seqs], use_tqdm=use_tqdm)
        i = 0
        for s in live:
            n = len(s.running)
            _advance(s, outs[i:i + n])
            i += n
    return [s.output(llm.engine.tokenizer) for s in searches]


async def beam_search_async(engine, prompt: Any, params: BeamSearchParams, request_id: str) -> BeamSearchOutput:
    """AsyncLLM.beam_search: each round's beams are concurrent engine requests
    (request ids `{request_id}-{round}-{beam}`); cancelling the call aborts them."""
    import asyncio

    async def last(seq: list[int], rid: str):
        out = None
        async for out in engine.generate(seq, step_params(search), rid):
            pass
        return out

    search = _searches(engine.engine, [prompt], params)[0]
    step = 0
    while not search.done:
        pending = search.pending()
        outs = await asyncio.gather(*(last(seq, f"{request_id}-{step}-{b}") for b, seq in enumerate(pending)))
        _advance(search, outs)
        step += 1
    return search.output(engine.engine.tokenizer)
