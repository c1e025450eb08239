"""Data parallelism: `data_parallel_size` engine replicas in one process.

Each replica is a whole LLMEngine (scheduler, KV pages, jitted step) on its own
`tensor_parallel_size` devices: row d of the data x model device grid. A new request goes
to the replica with the fewest unfinished requests and stays there; `step()` steps every
replica that has work. Replicas share nothing, so their outputs are exactly those of a
single engine.
"""

from __future__ import annotations

import dataclasses
import logging

from jaxserve.config import EngineConfig
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams
from jaxserve.models.config import ModelConfig
from jaxserve.models.loader import read_hf_config, resolve_model_dir

log = logging.getLogger(__name__)


def make_engine(config: EngineConfig) -> "LLMEngine | DataParallelEngine":
    return DataParallelEngine(config) if config.data_parallel_size > 1 else LLMEngine(config)


class DataParallelEngine:
    def __init__(self, config: EngineConfig, *, devices: list | None = None):
        if config.model is None:
            from jaxserve.demo_model import ensure_demo_model

            config = dataclasses.replace(config, model=str(ensure_demo_model()))
        mc = ModelConfig.from_hf(read_hf_config(resolve_model_dir(config.model)))
        mesh = config.mesh
        devices = mesh.validate_for(mc, devices)
        m = mesh.model
        log.info("data parallel: %d replicas of %d device(s) each", mesh.data, m)
        self.replicas = [LLMEngine(config, devices=devices[d * m:(d + 1) * m]) for d in range(mesh.data)]
        self._owner: dict[str, LLMEngine] = {}
        first = self.replicas[0]
        self.config, self.tokenizer, self.model_config = first.config, first.tokenizer, first.model_config
        self.max_model_len, self.model_path, self.dtype = first.max_model_len, first.model_path, first.dtype
        self.eos_token_ids = first.eos_token_ids
        self.structured = first.structured  # one grammar cache and compile pool for all replicas
        for replica in self.replicas[1:]:
            replica.structured.shutdown()
            replica.structured = first.structured

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    lora_request=None) -> list[int]:
        if request_id in self._owner:
            raise ValueError(f"request_id {request_id!r} is already in use")
        replica = min(self.replicas, key=lambda r: r.num_unfinished)
        ids = replica.add_request(request_id, prompt, params, lora_request=lora_request)
        self._owner[request_id] = replica
        return ids

    def add_lora(self, lora_request) -> bool:
        return all([r.add_lora(lora_request) for r in self.replicas])

    def remove_lora(self, lora_int_id: int) -> bool:
        """Refused (ValueError) while any replica has an unfinished request with the adapter."""
        for r in self.replicas:
            if r.lora is not None and lora_int_id in r.lora.known:
                busy = sum(1 for q in r.scheduler.requests.values()
                           if q.lora_request is not None and q.lora_request.lora_int_id == lora_int_id)
                if busy:
                    raise ValueError(f"LoRA adapter {lora_int_id} has {busy} unfinished requests; unload it "
                                     "when they are done")
        return any([r.remove_lora(lora_int_id) for r in self.replicas])

    def list_loras(self) -> set[int]:
        return set().union(*(r.list_loras() for r in self.replicas))

    def abort(self, request_id: str) -> bool:
        replica = self._owner.pop(request_id, None)
        return replica.abort(request_id) if replica is not None else False

    def has_unfinished_requests(self) -> bool:
        return any(r.has_unfinished_requests() for r in self.replicas)

    @property
    def num_unfinished(self) -> int:
        return sum(r.num_unfinished for r in self.replicas)

    @property
    def num_computed_tokens(self) -> int:
        return sum(r.num_computed_tokens for r in self.replicas)

    def step(self) -> list[RequestOutput]:
        """Dispatches every busy replica's step before waiting for any, so the replicas
        compute at the same time on their own devices."""
        busy = [r for r in self.replicas if r.has_unfinished_requests()]
        outputs: list[RequestOutput] = []
        for replica in busy:
            replica.begin_step()
        for replica in busy:
            outputs += replica.finish_step()
        for out in outputs:
            if out.finished:
                self._owner.pop(out.request_id, None)
        return outputs

    def stats(self) -> dict[str, int | float]:
        per = [r.stats() for r in self.replicas]
        same = {"kv_bytes_per_token", "weight_bytes_per_device"}  # equal in every replica: not summed
        return {key: per[0][key] if key in same else sum(s[key] for s in per) for key in per[0]}
