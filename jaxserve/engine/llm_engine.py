"""LLMEngine: the synchronous core. add_request -> step() -> RequestOutput deltas.

    add_request: validate against the model (context, vocabulary, pages), tokenize,
                 Request(WAITING) into the scheduler
    step:        Scheduler.schedule -> ModelRunner.execute (one jitted device step)
                 -> Scheduler.update (append tokens, stop checks, forks, free pages)
                 -> IncrementalDetokenizer per sample (text deltas, stop strings)
                 -> one RequestOutput delta per sample that got a token

Not thread-safe: AsyncLLM drives it from one background thread.
"""

from __future__ import annotations

import dataclasses
import logging
import random

import jax
import numpy as np
from transformers import AutoTokenizer

from jaxserve.config import EngineConfig
from jaxserve.engine.detokenizer import IncrementalDetokenizer
from jaxserve.core.kv_cache_manager import KVCacheManager
from jaxserve.worker.model_runner import MAX_BIAS_ENTRIES, ModelRunner
from jaxserve.outputs import CompletionOutput, Logprob, RequestOutput
from jaxserve.core.request import Request, RequestStatus
from jaxserve.worker.sampler import SamplingRow
from jaxserve.sampling_params import SamplingParams
from jaxserve.core.scheduler import Scheduler, SchedulerOutput
from jaxserve.sharding import Placement
from models.config import ModelConfig
from models.decoder import init_kv_caches
from models.loader import load_model, read_hf_config, resolve_dtype, resolve_model_dir

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30  # KV budget where the device reports no memory (CPU)


@dataclasses.dataclass
class _Group:
    """One user request: n samples sharing a prompt."""

    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizers: dict[int, IncrementalDetokenizer]
    num_finished: int = 0

    @property
    def finished(self) -> bool:
        return self.num_finished == self.params.n


def enable_compilation_cache(path: str) -> None:
    """Turns on JAX's persistent compilation cache, unless it is off or already configured."""
    if not path or jax.config.jax_compilation_cache_dir:
        return
    if path == "auto":
        from jaxserve.demo_model import cache_dir

        path = str(cache_dir() / "xla")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    log.info("persistent XLA compilation cache: %s", path)


class LLMEngine:
    def __init__(self, config: EngineConfig, *, devices: list | None = None):
        """devices: the tensor_parallel_size devices of this engine (default: all visible;
        a data-parallel engine hands each replica its own slice)."""
        self.config = config
        enable_compilation_cache(config.compilation_cache_dir)
        loaded, devices = self._load(config, devices)
        placement = self.placement
        self.model_config = mc = loaded.config
        self.dtype = loaded.dtype
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or loaded.model_dir)
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's "
                             f"max_position_embeddings {mc.max_position_embeddings}")
        self.eos_token_ids = frozenset(mc.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())
        kv_dtype = self.dtype if config.kv_cache_dtype == "auto" else resolve_dtype(config.kv_cache_dtype)
        max_pages_per_seq = -(-self.max_model_len // config.page_size)
        num_pages = config.num_pages or self._pages_from_budget(kv_dtype, max_pages_per_seq, devices[0])
        self.kv = KVCacheManager(num_pages, config.page_size, max_pages_per_seq,
                                 enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   max_model_len=self.max_model_len)
        log.info("KV cache: %d pages x %d tokens (%s), %d layers, %s over %d device(s)", num_pages, config.page_size,
                 np.dtype(kv_dtype).name, mc.num_layers,
                 "split by kv head" if placement.kv_heads_sharded and placement.size > 1 else "replicated",
                 placement.size)
        self.runner = ModelRunner(
            loaded.model, init_kv_caches(mc, num_pages, config.page_size, kv_dtype, placement.kv_sharding),
            page_size=config.page_size, max_model_len=self.max_model_len, token_buckets=config.token_buckets,
            seq_buckets=config.seq_buckets, block_table_fn=self.kv.get_block_table,
            max_logprobs=config.max_logprobs, placement=placement)
        self.runner.warm_up()
        self._rng = random.Random(config.seed)
        self._groups: dict[str, _Group] = {}
        self._pending: list[Request] = []  # got a token in the last step; output not processed yet
        self._in_flight: tuple | None = None  # a dispatched step awaiting finish_step
        self.num_computed_tokens = 0  # tokens run through the model since start (all steps)

    def _load(self, config: EngineConfig, devices: list | None):
        """Checks the mesh against the model, then loads the weights into their shards."""
        model_path = config.model
        if model_path is None:
            from jaxserve.demo_model import ensure_demo_model

            model_path = str(ensure_demo_model())
        mc = ModelConfig.from_hf(read_hf_config(resolve_model_dir(model_path)))
        mesh_cfg = dataclasses.replace(config.mesh, data=1)
        devices = mesh_cfg.validate_for(mc, devices)
        self.placement = placement = Placement(mesh_cfg.replica_meshes(devices)[0], mesh_cfg.rule_table, mc)
        self.model_path = model_path
        loaded = load_model(model_path, dtype=config.dtype, attention_backend=config.attention_backend,
                            sharding_fn=placement.sharding, mesh=placement.mesh,
                            kv_heads_sharded=placement.kv_heads_sharded)
        return loaded, devices

    def _pages_from_budget(self, kv_dtype, max_pages_per_seq: int, device) -> int:
        mc, cfg = self.model_config, self.config
        kv_heads_per_device = mc.num_kv_heads // self.placement.size if self.placement.kv_heads_sharded else mc.num_kv_heads
        page_bytes = mc.num_layers * cfg.page_size * 2 * kv_heads_per_device * mc.head_dim * np.dtype(kv_dtype).itemsize
        budget = cfg.kv_cache_memory_bytes
        if budget is None:
            stats = device.memory_stats() or {}
            if "bytes_limit" in stats:
                budget = int((stats["bytes_limit"] - stats.get("bytes_in_use", 0)) * cfg.memory_fraction)
            else:
                budget = CPU_KV_CACHE_BYTES
        useful = cfg.max_num_seqs * max_pages_per_seq + 1  # more pages than this can never be used
        num_pages = min(budget // page_bytes, useful)
        if num_pages < 2:
            raise ValueError(f"the KV budget of {budget} bytes holds {num_pages} pages of {page_bytes} bytes; "
                             "raise kv_cache_memory_bytes or memory_fraction, or set num_pages")
        return int(num_pages)

    # -- requests --------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> list[int]:
        """Validates and queues a request; returns its prompt token ids. Raises ValueError
        naming the field and the limit."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if request_id in self._groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, ids = self._tokenize(prompt)
        max_tokens = self._check_request(ids, params)
        if params.seed is not None:
            seeds = [params.seed + k for k in range(params.n)]
        else:
            seeds = [self._rng.getrandbits(31) for _ in range(params.n)]
        req = Request(request_id, ids, params, max_tokens=max_tokens, eos_token_ids=self.eos_token_ids, seeds=seeds)
        self._groups[request_id] = _Group(text, ids, params, {0: self._detokenizer(ids, params)})
        self.scheduler.add_request(req)
        return ids

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        vocab = self.model_config.vocab_size
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return prompt, list(self.tokenizer(prompt)["input_ids"])
        if not isinstance(prompt, (list, tuple)) or not all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("prompt_token_ids must not be empty")
        bad = [int(t) for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids must be in [0, {vocab}) (the vocabulary), got {bad[0]}")
        return None, [int(t) for t in prompt]

    def _check_request(self, ids: list[int], params: SamplingParams) -> int:
        n_prompt, limit = len(ids), self.max_model_len
        if n_prompt >= limit:
            raise ValueError(f"prompt has {n_prompt} tokens; max_model_len is {limit}, so at most "
                             f"{limit - 1} prompt tokens leave room for one generated token")
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - n_prompt
        if n_prompt + max_tokens > limit:
            raise ValueError(f"max_tokens {max_tokens} does not fit: the prompt has {n_prompt} tokens and "
                             f"max_model_len is {limit}, so max_tokens must be <= {limit - n_prompt}")
        params.validate_for_model(vocab_size=self.model_config.vocab_size)
        if params.logprobs is not None and params.logprobs > self.config.max_logprobs:
            raise ValueError(f"logprobs must be <= {self.config.max_logprobs} (max_logprobs), got {params.logprobs}")
        bias = len(params.logit_bias or ()) + len(params.stop_token_ids) + len(self.eos_token_ids)
        if bias > MAX_BIAS_ENTRIES:
            raise ValueError(f"logit_bias has too many entries: with stop_token_ids at most "
                             f"{MAX_BIAS_ENTRIES - len(params.stop_token_ids) - len(self.eos_token_ids)}")
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n must be <= {self.config.max_num_seqs} (max_num_seqs), got {params.n}")
        page = self.config.page_size
        pages = -(-n_prompt // page) + params.n * (-(-max_tokens // page) + 1)
        if pages > self.kv.num_total_pages:
            raise ValueError(f"max_tokens {max_tokens} with n={params.n} needs up to {pages} KV pages, more than "
                             f"the {self.kv.num_total_pages} of the cache (num_pages); lower max_tokens or n")
        return max_tokens

    def _detokenizer(self, ids: list[int], params: SamplingParams) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens,
                                      stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output,
                                      min_tokens=params.min_tokens)

    def _make_child(self, parent: Request, k: int) -> Request:
        group = self._groups[parent.request_id]
        group.detokenizers[k] = self._detokenizer(parent.prompt_token_ids, parent.params)
        return Request(f"{parent.request_id}#{k}", parent.prompt_token_ids, parent.params,
                       max_tokens=parent.max_tokens, eos_token_ids=parent.eos_token_ids, seeds=parent.seeds,
                       sample_index=k, parent_id=parent.request_id, arrival=parent.arrival)

    def abort(self, request_id: str) -> bool:
        """Stops a request (all its samples) and frees its pages. False if it is unknown."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return False
        for k in range(group.params.n):
            self.scheduler.abort(request_id if k == 0 else f"{request_id}#{k}")
        return True

    def has_unfinished_requests(self) -> bool:
        """Requests to schedule, or sampled tokens whose outputs are not returned yet."""
        return self.scheduler.has_unfinished() or bool(self._pending)

    @property
    def num_unfinished(self) -> int:
        """User requests accepted and not finished yet."""
        return len(self._groups)

    # -- one step --------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One engine step. Output processing (detokenization, stop strings, RequestOutputs)
        of the previous step's tokens runs while this step computes on the device, so a
        token's delta is returned by the step after the one that sampled it. A request ended
        by a stop string found that late has computed one token too many; it is dropped."""
        outputs = self.begin_step()
        self.finish_step()
        return outputs

    def begin_step(self) -> list[RequestOutput]:
        """Schedules and dispatches a step (without waiting for it), then returns the outputs
        of the previous step's tokens. `finish_step` must follow before the next begin_step;
        a data-parallel engine begins every replica's step before finishing any."""
        out = self.scheduler.schedule()
        self._in_flight = None
        if not out.is_empty:
            rows = self._sampling_rows(out)
            want_logprobs = any(r.params.logprobs is not None for r in rows)
            self._in_flight = (out, rows, want_logprobs, self.runner.dispatch(out, rows))
        pending, self._pending = self._pending, []
        return [self._output(req) for req in pending if req.parent_id in self._groups]

    def finish_step(self) -> None:
        """Waits for the dispatched step's tokens and applies them (stop checks, forks)."""
        if self._in_flight is None:
            return
        out, rows, want_logprobs, handle = self._in_flight
        self._in_flight = None
        tokens, logprobs = self.runner.collect(handle, want_logprobs)
        self.num_computed_tokens += out.num_tokens
        sampled = []
        for i, row in enumerate(rows):
            lp = None
            if row.params.logprobs is not None:
                k = row.params.logprobs
                lp = (float(logprobs[0][i]), logprobs[1][i, :k].tolist(), logprobs[2][i, :k].tolist())
            sampled.append((int(tokens[i]), lp))
        self._pending = self.scheduler.update(out, sampled, self._make_child)

    def _sampling_rows(self, out: SchedulerOutput) -> list[SamplingRow]:
        rows = []
        for s in out.seqs:
            req = s.request
            # Token lists only feed the penalties: copying them every step for every row would
            # cost O(context) host time per sequence for nothing.
            penalized = req.params.needs_penalties
            prompt_ids = req.prompt_token_ids if penalized else ()
            output_ids = req.output_token_ids if penalized else ()
            for k in range(s.num_samples):
                seed = req.seeds[k] if s.num_samples > 1 else req.seed
                rows.append(SamplingRow(req.params, seed, req.num_output_tokens, prompt_ids, output_ids,
                                        req.banned_tokens()))
        return rows

    def _output(self, req: Request) -> RequestOutput:
        group = self._groups[req.parent_id]
        detok = group.detokenizers[req.sample_index]
        token = req.token_ids[-1]
        # The EOS or stop token that ended the request is not part of the text (as vLLM).
        ended_by_token = req.is_finished and req.status == RequestStatus.FINISHED_STOPPED
        text = "" if ended_by_token else detok.append([token])
        if detok.stop_reason is not None and not req.is_finished:
            req.stop_reason = detok.stop_reason
            self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
        if req.is_finished:
            text += detok.flush()
            group.num_finished += 1
        logprobs = None
        if req.params.logprobs is not None and req.logprobs:
            sampled_lp, ids, lps = req.logprobs[-1]
            entry = {i: Logprob(lp, rank=r + 1) for r, (i, lp) in enumerate(zip(ids, lps))}
            entry.setdefault(token, Logprob(sampled_lp))
            logprobs = [entry]
        completion = CompletionOutput(req.sample_index, text, [token], logprobs, req.status.finish_reason,
                                      req.stop_reason)
        if group.finished:
            del self._groups[req.parent_id]
        return RequestOutput(req.parent_id, group.prompt, group.prompt_token_ids, [completion], group.finished,
                             req.num_cached_prompt_tokens)

    def stats(self) -> dict[str, int | float]:
        return {
            "compile_count": self.runner.compile_count,
            "num_free_pages": self.kv.num_free_pages,
            "num_total_pages": self.kv.num_total_pages,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hit_tokens": self.kv.prefix_cache_hit_tokens,
            "prefix_cache_query_tokens": self.kv.prefix_cache_query_tokens,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
        }
