"""How much device memory a step needs besides the weights and the KV pages, measured before
the KV cache is allocated, so the pages fill what is really left.

The largest body program (the largest token bucket) and the largest sampler (the largest
row bucket) are compiled ahead of time against an abstract two-page KV cache and the slot
state; XLA's memory analysis gives their temporaries (activations, the attention gather,
logits, sampler scratch), which do not depend on the number of pages. The KV budget is then

    (device limit - bytes in use) * memory_fraction - max(temporaries) - slot state

so a large bucket cannot run out of memory in the middle of serving. The body's output of
every row's hidden state [T, D] (the prompt-logprob program's input) counts with the body's
temporaries and with those of the prompt-logprob program (LM head over all T rows), which is
compiled too unless enable_prompt_logprobs is off. The profile compiles these programs once
at start; they are not part of the engine's compile count.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import numpy as np
from flax import nnx

from jaxserve.core.step_shapes import StepShapes
from jaxserve.kernels.kv_quant import SCALE_BYTES, is_quantized_dtype
from jaxserve.worker.bitmask import allow_all
from jaxserve.worker.input_batch import CELL_BUCKET, BodyInputs, Cells, SampleInputs, init_slot_state
from jaxserve.worker.model_runner import _body, _sample
from jaxserve.models.lora_layers import lora_paths
from jaxserve.worker.spec_decode import SpecVerifier
from jaxserve.worker.prompt_logprobs import prompt_logprobs_program

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StepMemory:
    temp_bytes: int  # the largest temporaries of the body and sampler programs
    state_bytes: int  # the persistent slot state

    @property
    def total(self) -> int:
        return self.temp_bytes + self.state_bytes


def profile_step_memory(model, kv_spec, *, shapes: StepShapes, page_size: int, max_pages_per_seq: int,
                        num_logprobs: int, placement=None, num_speculative_tokens: int = 0,
                        prompt_logprobs: bool = True) -> StepMemory:
    """kv_spec: a pytree of jax.ShapeDtypeStruct like the KV cache (any page count).
    num_speculative_tokens K > 0: the verify program (K + 1 logits rows per row) replaces the sampler."""
    graphdef, params = nnx.split(model)
    state = init_slot_state(shapes.max_num_seqs + 1, max_pages_per_seq, model.cfg.vocab_size)
    state_bytes = sum(a.nbytes for a in jax.tree.leaves(state))
    rep = None if placement is None else placement.replicated
    abstract = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep)  # noqa: E731
    state = jax.tree.map(abstract, state)
    t = shapes.max_num_tokens
    s, r = shapes.seqs(t), shapes.row_buckets[-1]
    body_in = jax.tree.map(abstract, BodyInputs(np.zeros(t, np.int32), np.zeros(s + 1, np.int32),
                                                np.zeros(s, np.int32), np.zeros(1, np.int32),
                                                np.zeros(shapes.max_num_seqs * (num_speculative_tokens + 1),
                                                         np.int32)))
    lora = bool(lora_paths(params))  # a model with LoRA slots profiles the step that computes the deltas
    body = jax.jit(functools.partial(_body, graphdef, page_size=page_size, lora=lora), donate_argnums=(1, 2))
    cells = jax.tree.map(abstract, Cells(*(np.zeros(CELL_BUCKET, np.int32) for _ in range(4))))
    body_c = body.lower(params, kv_spec, state, body_in, cells).compile()
    hidden = jax.ShapeDtypeStruct((shapes.max_num_seqs * (num_speculative_tokens + 1), model.cfg.hidden_size),
                                  model.dtype, sharding=rep)
    sample_in = jax.tree.map(abstract, SampleInputs(np.zeros(r, np.int32), np.zeros(r, np.int32),
                                                    np.zeros(r, np.bool_),
                                                    allow_all(r, -(-model.cfg.vocab_size // 32))))
    if num_speculative_tokens:
        verifier = SpecVerifier(graphdef, num_speculative_tokens=num_speculative_tokens, num_logprobs=num_logprobs)
        verify_in = verifier.inputs(np.zeros(r, np.int32), np.zeros(r, np.int32), np.zeros(r, np.bool_),
                                    allow_all(r, -(-model.cfg.vocab_size // 32)), [])
        sample_c = verifier.jit.lower(params, state, hidden, jax.tree.map(abstract, verify_in)).compile()
    else:
        sampler = jax.jit(functools.partial(_sample, graphdef, num_logprobs=num_logprobs), donate_argnums=(1,))
        sample_c = sampler.lower(params, state, hidden, sample_in).compile()
    # The body's output of every row's hidden state [T, D] is live through the prompt-logprob
    # program (its input): counted beside the temporaries of both.
    hidden_all = jax.ShapeDtypeStruct((t, model.cfg.hidden_size), model.dtype, sharding=rep)
    all_bytes = t * model.cfg.hidden_size * np.dtype(model.dtype).itemsize
    temps = [_temp_bytes(body_c) + all_bytes, _temp_bytes(sample_c)]
    if prompt_logprobs:  # LM-head blocks over every row (worker/prompt_logprobs.py)
        plp = jax.jit(functools.partial(prompt_logprobs_program, graphdef, num_logprobs=num_logprobs))
        targets = jax.ShapeDtypeStruct((t,), np.int32, sharding=rep)
        temps.append(_temp_bytes(plp.lower(params, hidden_all, targets).compile()) + all_bytes)
    log.info("step memory profile: body(%d tokens) %s, sampler(%d rows) %s, prompt-logprob program %s of temporaries, "
             "slot state %.1f MiB", t, _mib(temps[0]), r, _mib(temps[1]), _mib(temps[-1] if prompt_logprobs else 0),
             state_bytes / 2**20)
    return StepMemory(max(temps), state_bytes)


def _temp_bytes(compiled) -> int:
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):  # a backend without memory analysis
        stats = None
    if stats is None:
        log.warning("this backend reports no memory analysis: step temporaries are not reserved")
        return 0
    return int(stats.temp_size_in_bytes)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """Per-device sizes of the KV cache [L, P, B, 2K, H] on one replica's mesh. Pages are sized by
    bytes: an 8-bit cache (int8 / fp8, pallas_kernels.kv_quant) stores 1-byte values plus a float32
    scale per token and cached kv head for K and for V, so a budget holds about twice the tokens of
    a 16-bit cache (2H / (H + 4): 1.94x at head_dim 128)."""

    num_layers: int
    page_size: int
    head_dim: int
    itemsize: int
    num_kv_heads: int  # the model's own kv heads
    cache_kv_heads: int  # K: kv heads in the cache, each of the model's copied kv_head_replicas times
    heads_per_device: int  # of K, held by each device
    num_devices: int
    scale_bytes: int = 0  # per token, kv head and K/V: the 8-bit cache's scale (0 for float caches)

    @classmethod
    def of(cls, cfg, placement, page_size: int, dtype) -> "KVLayout":
        """cfg: the loaded ModelConfig (with its kv_head_replicas); placement: jaxserve.sharding.Placement."""
        scale = SCALE_BYTES if is_quantized_dtype(dtype) else 0
        return cls(cfg.num_layers, page_size, cfg.head_dim, np.dtype(dtype).itemsize, cfg.num_kv_heads,
                   cfg.cache_kv_heads, placement.kv_heads_per_device, placement.size, scale)

    @property
    def token_bytes(self) -> int:
        """One token's K and V in every layer, on one device."""
        return self.num_layers * 2 * self.heads_per_device * (self.head_dim * self.itemsize + self.scale_bytes)

    @property
    def page_bytes(self) -> int:
        return self.token_bytes * self.page_size

    def describe(self, num_pages: int) -> str:
        copies = self.cache_kv_heads // self.num_kv_heads
        heads = f"{self.heads_per_device} of {self.cache_kv_heads} cached kv heads" + (
            f" ({self.num_kv_heads} kv heads x {copies} copies)" if copies > 1 else "")
        scales = " (scales included)" if self.scale_bytes else ""
        return (f"{num_pages} pages x {self.page_size} tokens, {self.num_layers} layers; per device "
                f"({self.num_devices}): {heads}, {self.token_bytes} B per token{scales}, {self.page_bytes} B per page, "
                f"{_mib(num_pages * self.page_bytes)} in all")


def kv_pages_for(free_bytes: int, *, memory_fraction: float, step: StepMemory, page_bytes: int,
                 useful_pages: int) -> int:
    """Pages that fit in memory_fraction of the free bytes once the step's own memory is
    reserved; never more than can ever be used."""
    budget = int(free_bytes * memory_fraction) - step.total
    return max(0, min(budget // page_bytes, useful_pages))
