"""LLMEngine: the synchronous core. add_request -> step() -> RequestOutput deltas.

One call of `step()` with the overlapped loop (`async_scheduling`, on by default):

    host                                         device
    ----                                         ------
    schedule step N+1 (placeholders for N)       ... running step N
    dispatch N+1: diffs + body + sample          queued behind N; N+1 starts as N ends
    collect N (waits for N's async D2H copy)
    Scheduler.update(N): tokens, stop checks,
      forks, pages freed                         running step N+1
    output processing(N): detokenize, stop
      strings -> RequestOutput deltas
    return the deltas of step N

Structured outputs: a step with constrained rows needs, for its sampler, the grammar state
after step N's tokens. begin_step queues step N+1's body first, then applies step N's tokens
to the scheduler (update only: detokenization waits for finish_step), fills N+1's token
bitmask from the requests' matchers and queues N+1's sampler with it: the mask is computed
while the device runs N+1's body (engine/structured_output.py).

So the host's scheduling, input building, update and detokenization all run while the
device computes, and step N+1 reads the tokens of step N on the device (the slot's last
token), never waiting for the host. Exactness: a request that stops at step N (length,
EOS, stop token, stop string, abort) may already be in step N+1; that token is dropped.
Length limits are known ahead, so a request is never scheduled past them. With
`async_scheduling=False` each step is scheduled only after the previous one was applied;
outputs are token-identical either way.

Speculative decoding (`speculative_config`, core.spec_decode / worker.spec_decode): a step's
proposals are looked up in the tokens of the step before, and its length depends on how many
of them were accepted, so step N+1 is scheduled only after step N's tokens are in the
scheduler (update). With `async_scheduling` the rest of step N's host work, its output
processing (detokenization, stop strings, n/best_of aborts, the deltas), runs after step N+1
was dispatched, while the device computes it:

    host                                         device
    ----                                         ------
    schedule step N+1 (proposals from N's tokens)
    dispatch N+1: verify rows + rejection sampler
    output processing(N)                         running step N+1
    collect N+1, Scheduler.update(N+1)
    return the deltas of step N

A request that a stop string ends in output processing(N) may be in step N+1: its tokens there
are dropped (update skips finished requests), as in the overlapped loop. Without
`async_scheduling` each step is processed before the next is scheduled.

Not thread-safe: AsyncLLM drives it from one background thread.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import random

import jax
import numpy as np
from flax import nnx
from transformers import AutoTokenizer

from jaxserve.config import EngineConfig
from jaxserve.core.kv_cache_manager import KVCacheManager, uniform_sliding_window
from jaxserve.core.request import Request
from jaxserve.core.scheduler import Scheduler, SchedulerOutput
from jaxserve.core.spec_decode import Speculator
from jaxserve.core.step_shapes import StepShapes
from jaxserve.engine.best_of import BestOf, engine_params
from jaxserve.engine.input_processor import InputProcessor
from jaxserve.engine.output_processor import OutputProcessor, child_request_id
from jaxserve.engine.prompt_logprobs import PromptLogprobsCollector
from jaxserve.engine.structured_output import StructuredOutputManager, needs_bitmask
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams
from jaxserve.sharding import Placement
from jaxserve.worker.memory_profile import KVLayout, kv_pages_for, profile_step_memory
from jaxserve.worker.model_runner import ModelRunner, StepHandle
from jaxserve.worker.spec_draft import DraftRunner
from jaxserve.models.config import ModelConfig
from jaxserve.models.decoder import init_kv_caches, kv_cache_sharding
from jaxserve.models.loader import load_model, read_hf_config, resolve_dtype, resolve_model_dir
from jaxserve.models.quantize_weights import param_bytes
from jaxserve.kernels.backend import interpret_mode, resolve_backend
from jaxserve.kernels.kv_quant import is_quantized_dtype, kv_cache_dtype

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30  # KV budget where the device reports no memory (CPU)


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
        spec = config.speculative_config
        # A speculating step is scheduled after the step before is in the scheduler (module docstring).
        self.speculator = Speculator(spec) if spec is not None else None
        enable_compilation_cache(config.compilation_cache_dir)
        loaded, devices = self._load(config, devices)
        placement = self.placement
        self.model_config = mc = loaded.config
        self.dtype = loaded.dtype
        self.model_dir = str(loaded.model_dir)  # the HF directory (generation_config.json, tokenizer files)
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or loaded.model_dir)
        # The engine refuses prompts longer than max_model_len itself (a clear error naming the field);
        # transformers' "Token indices sequence length is longer than the specified maximum" warning
        # for them would only be noise. It warns once per tokenizer: mark it as already given.
        getattr(self.tokenizer, "deprecation_warnings", {})["sequence-length-is-longer-than-the-specified-maximum"] = True
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        if config.max_model_len and config.max_model_len > mc.max_position_embeddings:
            log.warning("max_model_len %d exceeds the model's max_position_embeddings %d: using %d",
                        config.max_model_len, mc.max_position_embeddings, self.max_model_len)
        self.eos_token_ids = frozenset(mc.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())
        draft = self._load_draft(spec, mc) if spec is not None and spec.method == "draft_model" else None
        kv_dtype = (self.dtype if config.kv_cache_dtype == "auto"
                    else kv_cache_dtype(config.kv_cache_dtype) or resolve_dtype(config.kv_cache_dtype))
        max_pages_per_seq = -(-self.max_model_len // config.page_size)
        self.attention_backend = resolve_backend(config.attention_backend, quantized_kv=is_quantized_dtype(kv_dtype))
        if self.attention_backend in ("jax_tpu", "pallas_tpu") and not interpret_mode(self.attention_backend):
            # Both TPU kernels keep block-table data in SMEM (1 MiB a core): refuse at start,
            # with the numbers, a configuration whose tables cannot fit.
            from jaxserve.kernels.attention_tpu import check_smem_fit

            check_smem_fit(self.attention_backend, config.max_num_seqs + 1, self.max_model_len, config.page_size,
                           max_num_tokens=config.max_num_batched_tokens)
        log.info("attention backend: %s (attention_backend=%r)", self.attention_backend, config.attention_backend)
        self.shapes = StepShapes(config.token_buckets, config.seq_buckets, config.max_num_seqs)
        draft_page_bytes = 0
        if draft is not None:  # one device: every cached kv head of the draft there
            dc = draft.config
            draft_page_bytes = KVLayout(dc.num_layers, config.page_size, dc.head_dim, np.dtype(draft.dtype).itemsize,
                                        dc.num_kv_heads, dc.cache_kv_heads, dc.cache_kv_heads, 1).page_bytes
        num_pages = config.num_pages or self._pages_from_budget(loaded.model, kv_dtype, max_pages_per_seq, devices[0],
                                                                draft_page_bytes)
        # Pages slide out of the window only when every layer shares one window (Mistral);
        # mixed local/global models (Gemma, Qwen2 max_window_layers) keep all their pages.
        self.kv = KVCacheManager(num_pages, config.page_size, max_pages_per_seq,
                                 enable_prefix_caching=config.enable_prefix_caching,
                                 sliding_window=uniform_sliding_window(mc.sliding_windows))
        self.lora = self._lora_manager(config) if config.enable_lora else None
        self.scheduler = Scheduler(self.kv, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   max_model_len=self.max_model_len,
                                   long_prompt_threshold=mc.rope.long_context_threshold, lora=self.lora,
                                   speculator=self.speculator)
        self.kv_layout = KVLayout.of(mc, placement, config.page_size, kv_dtype)
        log.info("KV cache (%s): %s", np.dtype(kv_dtype).name, self.kv_layout.describe(num_pages))
        # Prompt logprobs are computed in plain steps only: speculating engines refuse them.
        prompt_logprobs = config.enable_prompt_logprobs and spec is None
        self.runner = ModelRunner(
            loaded.model, init_kv_caches(mc, num_pages, config.page_size, kv_dtype, placement.kv_sharding),
            page_size=config.page_size, max_model_len=self.max_model_len, shapes=self.shapes,
            block_table_fn=self.kv.block_table_view, max_logprobs=config.max_logprobs, placement=placement,
            num_speculative_tokens=spec.num_speculative_tokens if spec is not None else 0,
            draft=None if draft is None else DraftRunner(
                draft.model, init_kv_caches(draft.config, num_pages, config.page_size, draft.dtype,
                                            self.draft_placement.kv_sharding),
                num_speculative_tokens=spec.num_speculative_tokens, page_size=config.page_size,
                placement=self.draft_placement),
            prompt_logprobs=prompt_logprobs)
        self.runner.warm_up()
        self.inputs = InputProcessor(self.tokenizer, vocab_size=mc.vocab_size, max_model_len=self.max_model_len,
                                     max_logprobs=config.max_logprobs, max_num_seqs=config.max_num_seqs,
                                     page_size=config.page_size, num_total_pages=self.kv.num_total_pages,
                                     eos_token_ids=self.eos_token_ids, sliding_window=self.kv.sliding_window,
                                     max_num_batched_tokens=config.max_num_batched_tokens,
                                     prompt_logprobs=prompt_logprobs)
        self.outputs = OutputProcessor(self.tokenizer)
        self.structured = StructuredOutputManager(self.tokenizer, vocab_size=mc.vocab_size,
                                                  eos_token_ids=self.eos_token_ids,
                                                  compile_timeout_s=config.structured_outputs_compile_timeout_s)
        self.prompt_logprobs = PromptLogprobsCollector()
        self.best_of = BestOf()
        self._updated: list[list[Request]] = []  # steps applied early (masks), their outputs not made yet
        self._rng = random.Random(config.seed)
        # Dispatched steps whose tokens are not applied yet, oldest first (at most two).
        self._in_flight: collections.deque[tuple[SchedulerOutput, StepHandle]] = collections.deque()
        self._dispatched = False  # the last begin_step queued a step
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
                            kv_head_replicas=placement.kv_head_replicas, expert_parallel=placement.expert_parallel,
                            quantization=config.quantization,
                            activation_quantization=config.activation_quantization)
        if config.enable_lora:  # the adapter slots (zeros), sharded like their base layers
            from jaxserve.models.lora_layers import attach_lora

            attach_lora(loaded.model, max_loras=config.max_loras, max_lora_rank=config.max_lora_rank,
                        method=config.lora_delta_method, sharding_fn=placement.sharding)
        self.weight_bytes, self.weight_bytes_per_device = param_bytes(nnx.state(loaded.model, nnx.Param))
        log.info("weights (quantization=%s%s): %.1f MiB, %.1f MiB per device", loaded.config.quantization,
                 ", w8a8 activations" if loaded.config.activation_quantization else "",
                 self.weight_bytes / 2**20, self.weight_bytes_per_device / 2**20)
        return loaded, devices

    def _lora_manager(self, config: EngineConfig):
        """The adapters' host registry and device slots (engine/lora_manager.py)."""
        from jaxserve.engine.lora_manager import LoRAManager, read_adapter

        def read(lora):
            return read_adapter(lora, self.model_config, self.runner.lora.paths, config.max_lora_rank, self.dtype)

        return LoRAManager(max_loras=config.max_loras, max_cpu_loras=config.max_cpu_loras, read=read,
                           write=lambda slot, arrays: self.runner.lora.write(slot, arrays))

    # -- adapters (vLLM's add_lora / remove_lora / list_loras) ---------------------------

    def add_lora(self, lora_request) -> bool:
        """Reads and checks an adapter now (ValueError if it is bad); it is loaded into a device
        slot when a request first needs it."""
        self._require_lora()
        self.lora.register(lora_request)
        return True

    def remove_lora(self, lora_int_id: int) -> bool:
        """Forgets an adapter; False if unknown. Refused (ValueError) while any unfinished
        request uses it: its tokens are never computed with another adapter's weights."""
        self._require_lora()
        if lora_int_id not in self.lora.known:
            return False
        unfinished = sum(1 for r in self.scheduler.requests.values()
                         if r.lora_request is not None and r.lora_request.lora_int_id == lora_int_id)
        self.lora.remove(lora_int_id, unfinished)
        return True

    def list_loras(self) -> set[int]:
        return set(self.lora.known) if self.lora is not None else set()

    def _require_lora(self) -> None:
        if self.lora is None:
            raise ValueError("lora_request needs an engine started with enable_lora=True (--enable-lora)")

    def _load_draft(self, spec, mc: ModelConfig):
        """The draft model of speculative_config.method 'draft_model', checked against the target."""
        if self.placement.size > 1:
            raise ValueError("speculative_config.method 'draft_model' runs on one device only "
                             f"(tensor_parallel_size 1), got {self.placement.size}")
        dc = ModelConfig.from_hf(read_hf_config(resolve_model_dir(spec.model)))
        # the target's (one-device) mesh and rules: its arrays and programs are placed like the target's
        self.draft_placement = dp = Placement(self.placement.mesh, self.config.mesh.rule_table, dc)
        draft = load_model(spec.model, dtype=spec.dtype, attention_backend=self.config.attention_backend,
                           sharding_fn=dp.sharding, mesh=dp.mesh, kv_head_replicas=dp.kv_head_replicas,
                           expert_parallel=dp.expert_parallel)
        if draft.config.vocab_size != mc.vocab_size:
            raise ValueError(f"speculative_config.model: the draft's vocab_size {draft.config.vocab_size} differs "
                             f"from the target's {mc.vocab_size}")
        if draft.config.max_position_embeddings < self.max_model_len:
            raise ValueError(f"speculative_config.model: the draft's max_position_embeddings "
                             f"{draft.config.max_position_embeddings} is below max_model_len {self.max_model_len}")
        return draft

    def _pages_from_budget(self, model, kv_dtype, max_pages_per_seq: int, device, draft_page_bytes: int = 0) -> int:
        """Pages from kv_cache_memory_bytes, or from the device's free memory less what the
        largest step needs besides the KV cache (a profile of its compiled programs).
        draft_page_bytes: a draft model's page of the same index (its cache has as many pages)."""
        mc, cfg = self.model_config, self.config
        page_bytes = KVLayout.of(mc, self.placement, cfg.page_size, kv_dtype).page_bytes + draft_page_bytes
        useful = cfg.max_num_seqs * max_pages_per_seq + 1  # more pages than this can never be used
        stats = device.memory_stats() or {}
        if cfg.kv_cache_memory_bytes is not None or "bytes_limit" not in stats:
            budget = cfg.kv_cache_memory_bytes or CPU_KV_CACHE_BYTES
            num_pages = min(budget // page_bytes, useful)
        else:
            shape = jax.eval_shape(lambda: init_kv_caches(mc, 2, cfg.page_size, kv_dtype))
            spec = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                shape, kv_cache_sharding(self.placement.kv_sharding, shape))
            step = profile_step_memory(model, spec, shapes=self.shapes, page_size=cfg.page_size,
                                       max_pages_per_seq=max_pages_per_seq, num_logprobs=max(1, cfg.max_logprobs),
                                       placement=self.placement,
                                       num_speculative_tokens=(cfg.speculative_config.num_speculative_tokens
                                                               if cfg.speculative_config is not None else 0),
                                       prompt_logprobs=cfg.enable_prompt_logprobs and cfg.speculative_config is None)
            budget = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
            num_pages = kv_pages_for(budget, memory_fraction=cfg.memory_fraction, step=step, page_bytes=page_bytes,
                                     useful_pages=useful)
        if num_pages < 2:
            raise ValueError(f"the KV budget of {budget} bytes holds {num_pages} pages of {page_bytes} bytes; "
                             "raise kv_cache_memory_bytes or memory_fraction, or set num_pages")
        return int(num_pages)

    # -- requests --------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    lora_request=None) -> list[int]:
        """Validates and queues a request; returns its prompt token ids. Raises ValueError
        naming the field and the limit. lora_request: a LoRARequest (the adapter is read and
        checked now), or None for the base model."""
        params = params if params is not None else SamplingParams()
        if request_id in self.outputs.groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        user_params, params = params, engine_params(params)  # best_of > n: n = best_of samples
        text, ids, max_tokens = self.inputs.process(prompt, params)
        self.structured.check(params)  # compiled (cached) or refused: ValueError naming the field
        if lora_request is not None:
            self.add_lora(lora_request)
        # One seed for the group: sample k folds k into its key, so samples are independent
        # streams and sample k of seed s is not sample 0 of seed s + k.
        seed = params.seed if params.seed is not None else self._rng.getrandbits(31)
        req = Request(request_id, ids, params, max_tokens=max_tokens, eos_token_ids=self.eos_token_ids, seed=seed,
                      lora_request=lora_request)
        self.outputs.add(request_id, text, ids, params)
        self.prompt_logprobs.add(request_id, params, len(ids))
        if params is not user_params:
            self.best_of.add(request_id, user_params)
        self.scheduler.add_request(req)
        return ids

    def abort(self, request_id: str) -> bool:
        """Stops a request (all its samples) and frees its pages. False if it is unknown."""
        group = self.outputs.abort(request_id)
        if group is None:
            return False
        self.prompt_logprobs.drop(request_id)
        self.best_of.drop(request_id)
        self._abort_samples(request_id, group.params.n)
        return True

    def _abort_samples(self, request_id: str, n: int) -> None:
        """Ends all n samples of a request in the scheduler (those not forked yet never will)."""
        for k in range(n):
            self.scheduler.abort(request_id if k == 0 else child_request_id(request_id, k))

    def has_unfinished_requests(self) -> bool:
        """Requests to schedule, or dispatched steps whose outputs are not returned yet."""
        return self.scheduler.has_unfinished() or bool(self._in_flight) or bool(self._updated)

    @property
    def num_unfinished(self) -> int:
        """User requests accepted and not finished yet."""
        return len(self.outputs.groups)

    # -- one step --------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One engine step: dispatch the next step, then apply the previous one (see the
        module docstring) and return its RequestOutput deltas."""
        self.begin_step()
        return self.finish_step()

    def begin_step(self) -> None:
        """Schedules and dispatches a step without waiting for it. A data-parallel engine
        begins every replica's step before finishing any."""
        out = self.scheduler.schedule()
        self.runner.batch.release(out.released)
        self._dispatched = not out.is_empty
        if self._dispatched:
            rows = [s.request for s in out.seqs for _ in range(s.num_samples)]
            if needs_bitmask(rows):
                handle = self.runner.dispatch(out, functools.partial(self._bitmask, rows))
            else:
                handle = self.runner.dispatch(out)
            self._in_flight.append((out, handle))

    def _bitmask(self, rows: list[Request], num_rows: int) -> np.ndarray:
        """The token bitmask of a step being dispatched (its body is queued): the steps still
        in flight are applied first, so every matcher has seen every token before it."""
        while self._in_flight:
            self._updated.append(self._update(*self._in_flight.popleft()))
        return self.structured.bitmask(rows, num_rows)

    def finish_step(self) -> list[RequestOutput]:
        """Applies the dispatched steps but the one `begin_step` just queued (overlapped), or
        all of them (synchronous, or when nothing new was scheduled: then every request is
        waiting for tokens still in flight)."""
        overlap = self.config.async_scheduling and self._dispatched
        keep = 1 if overlap and self.speculator is None else 0
        outputs: list[RequestOutput] = []
        for touched in self._updated:
            outputs += self._process(touched)
        self._updated.clear()
        while len(self._in_flight) > keep:
            if overlap and self.speculator is not None:  # updated now, processed while the next step runs
                self._updated.append(self._update(*self._in_flight.popleft()))
            else:
                outputs += self._apply(*self._in_flight.popleft())
        return outputs

    def _apply(self, out: SchedulerOutput, handle: StepHandle) -> list[RequestOutput]:
        return self._process(self._update(out, handle))

    def _update(self, out: SchedulerOutput, handle: StepHandle) -> list[Request]:
        """Step N's tokens into the scheduler; returns the requests it touched."""
        if self.runner.spec is None:  # (prompt logprobs are refused while speculating)
            prompt_logprobs = self.runner.collect_prompt_logprobs(handle)
            if prompt_logprobs is not None:
                self.prompt_logprobs.record(out, prompt_logprobs)
        self.num_computed_tokens += out.num_tokens
        if self.runner.spec is not None:
            return self.scheduler.update(out, self._verified_rows(out, handle), self.outputs.make_child)
        tokens, logprobs = self.runner.collect(handle)
        sampled = []
        rows = [(s.request, s.num_samples) for s in out.seqs if s.num_samples]
        i = 0
        for req, n in rows:
            k = req.params.logprobs
            for _ in range(n):
                lp = None
                if k is not None:
                    lp = (float(logprobs[0][i]), logprobs[1][i, :k].tolist(), logprobs[2][i, :k].tolist())
                sampled.append((int(tokens[i]), lp))
                i += 1
        return self.scheduler.update(out, sampled, self.outputs.make_child)

    def _verified_rows(self, out: SchedulerOutput, handle) -> list:
        """Per sample row of a verified step: (token, logprobs), or the emitted run [(token,
        logprobs), ...] of a speculating sequence; top logprobs cut to each request's count."""
        runs = self.runner.spec.collect(handle)
        rows = []
        i = 0
        for s in out.seqs:
            k = s.request.params.logprobs
            for _ in range(s.num_samples):
                run = [(t, None if lp is None or k is None else (lp[0], lp[1][:k], lp[2][:k])) for t, lp in runs[i]]
                rows.append(run if s.draft_token_ids else run[0])
                i += 1
        return rows

    def _process(self, touched: list[Request]) -> list[RequestOutput]:
        # A failure in one request's output processing finishes that request with an error
        # (RequestOutput.error); the engine serves on (OutputProcessor.process).
        outputs = self.outputs.process(touched, self.scheduler.finish, self._abort_samples)
        self.prompt_logprobs.attach(outputs)
        return self.best_of.filter(outputs)

    def stats(self) -> dict[str, int | float]:
        return {
            "compile_count": self.runner.compile_count,
            "num_free_pages": self.kv.num_free_pages,
            "num_total_pages": self.kv.num_total_pages,
            "kv_bytes_per_token": self.kv_layout.token_bytes,  # every layer, K and V (8-bit: with scales), per device
            "kv_cache_bytes": self.kv.num_total_pages * self.kv_layout.page_bytes,  # per device
            "weight_bytes": self.weight_bytes,  # every parameter (8-bit projections: values + scales)
            "weight_bytes_per_device": self.weight_bytes_per_device,  # the most one device holds
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hit_tokens": self.kv.prefix_cache_hit_tokens,
            "prefix_cache_query_tokens": self.kv.prefix_cache_query_tokens,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            **(self.lora.stats() if self.lora is not None else {}),
            **self._spec_stats(),
        }

    def _spec_stats(self) -> dict[str, int]:
        """Speculative decoding totals since start (absent when speculation is off)."""
        sp = self.speculator
        if sp is None:
            return {}
        return {"spec_num_drafts": sp.num_drafts, "spec_num_draft_tokens": sp.num_draft_tokens,
                "spec_num_accepted_tokens": sp.num_accepted_tokens}
