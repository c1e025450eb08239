"""LLM: the offline Python API (vLLM-style).

    llm = LLM(model="path/or/hub-id", config="cpu", max_model_len=512)   # a preset's name or a YAML path
    outs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(max_tokens=64, temperature=0.0))
    outs[0].outputs[0].text, outs[0].outputs[0].token_ids, outs[0].outputs[0].finish_reason
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any, Mapping, Sequence

from tqdm.auto import tqdm

from jaxserve.engine.chat import render_chat
from jaxserve.config import EngineConfig
from jaxserve.outputs import RequestOutput, merge_delta  # noqa: F401 (merge_delta: public here too)
from jaxserve.sampling_params import SamplingParams

Prompt = str | Sequence[int]


def _is_token_ids(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


class LLM:
    def __init__(self, model: str | None = None, config: str | os.PathLike | Mapping[str, Any] | None = None,
                 **overrides: Any):
        from jaxserve.engine.data_parallel import make_engine  # JAX and the model code: only when built

        self.config = EngineConfig.load(config, model=model, **overrides)
        self.engine = make_engine(self.config)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def stats(self) -> dict[str, int | float]:
        return self.engine.stats()

    def chat(self, messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Generates replies to one conversation ([{"role": ..., "content": ...}, ...]) or a
        list of them, each rendered by the tokenizer's chat template (or `chat_template`)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [render_chat(self.engine.tokenizer, c, chat_template=chat_template,
                               add_generation_prompt=add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request=None) -> list[RequestOutput]:
        """Generates for every prompt (a string or a list of token ids); outputs in input order.
        Either every request is accepted or none is (the first invalid one raises ValueError).
        lora_request: one LoRARequest for all prompts, a list with one (or None) per prompt, or
        None: the base model (the engine needs enable_lora=True for adapters)."""
        if isinstance(prompts, str) or _is_token_ids(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
        loras = _per_prompt_lora(lora_request, len(prompts))
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        for p in params:  # every grammar starts compiling (in parallel threads) before the first add waits
            # (not for a request the add will refuse anyway: min_tokens with a grammar, see structured.check)
            if isinstance(p, SamplingParams) and p.structured_outputs is not None and not p.min_tokens:
                self.engine.structured.submit(p.structured_outputs)
        try:
            for rid, prompt, p, lora in zip(ids, prompts, params, loras):
                self.engine.add_request(rid, prompt if isinstance(prompt, str) else list(prompt), p,
                                        **({"lora_request": lora} if lora is not None else {}))
        except Exception:
            for rid in ids:
                self.engine.abort(rid)
            raise
        return self._run(ids, use_tqdm)

    def beam_search(self, prompts: Sequence[Any], params: "BeamSearchParams",
                    use_tqdm: bool = False) -> "list[BeamSearchOutput]":
        """vLLM's LLM.beam_search, scored as transformers' generate(num_beams=...) (engine/beam_search.py):
        one BeamSearchOutput per prompt, its sequences best first."""
        from jaxserve.engine.beam_search import beam_search

        return beam_search(self, prompts, params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        done: set[str] = set()
        bar = tqdm(total=len(ids), desc="requests", unit="req", disable=not use_tqdm)
        start, generated = time.perf_counter(), 0
        try:
            while len(done) < len(ids):
                deltas = self.engine.step()
                if not deltas and not self.engine.has_unfinished_requests():
                    raise RuntimeError(f"the engine went idle with {len(ids) - len(done)} requests unfinished")
                for delta in deltas:
                    generated += sum(len(c.token_ids) for c in delta.outputs)
                    results[delta.request_id] = merge_delta(results.get(delta.request_id), delta)
                    if delta.finished:
                        done.add(delta.request_id)
                        bar.update(1)
                bar.set_postfix(tok_per_s=f"{generated / max(time.perf_counter() - start, 1e-9):.1f}", refresh=False)
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise
        finally:
            bar.close()
        return [results[i] for i in ids]


def _per_prompt_lora(lora_request, n: int) -> list:
    """lora_request as one entry (LoRARequest or None) per prompt."""
    from jaxserve.lora_request import LoRARequest

    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * n
    if not isinstance(lora_request, (list, tuple)):
        raise ValueError(f"lora_request must be a LoRARequest or a list of them, got {type(lora_request).__name__}")
    if len(lora_request) != n:
        raise ValueError(f"lora_request has {len(lora_request)} entries for {n} prompts")
    for r in lora_request:
        if r is not None and not isinstance(r, LoRARequest):
            raise ValueError(f"lora_request entries must be LoRARequest or None, got {type(r).__name__}")
    return list(lora_request)
