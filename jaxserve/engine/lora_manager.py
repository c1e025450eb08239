"""LoRAManager: which adapters are read into host memory and which hold a device slot.

    add_request(lora_request)  -> register(): the adapter is read and checked against the base
                                  model (ValueError naming the problem: a 400 / INVALID_ARGUMENT)
    Scheduler admits a request -> acquire(): the adapter's slot, loading it into a free slot or
                                  into the least recently used idle one (a device write, never a
                                  compile); False when every slot is pinned: the request waits
    request leaves the batch   -> release() (finish, abort, preemption): the slot stays loaded,
                                  idle, until another adapter needs it
    unload_lora_adapter        -> remove(): refused while any request uses the adapter

Slots 1..max_loras hold adapters (0 is the base model). Host copies (the slot-layout arrays)
are kept for max_cpu_loras adapters, least recently used dropped first; a dropped adapter is
read again from its path when it is next loaded. Called from the engine's thread only.
"""

from __future__ import annotations

import collections
import logging
from typing import Callable

import numpy as np

from jaxserve.core.request import Request
from jaxserve.lora_request import LoRARequest

log = logging.getLogger(__name__)

Arrays = dict[tuple, np.ndarray]


class LoRAManager:
    def __init__(self, *, max_loras: int, max_cpu_loras: int | None, read: Callable[[LoRARequest], Arrays],
                 write: Callable[[int, Arrays], None]):
        """read: an adapter's slot contents (raises ValueError for a bad adapter); write(slot,
        arrays): puts them into device slot `slot`."""
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras or max_loras
        self._read, self._write = read, write
        self.known: dict[int, LoRARequest] = {}  # lora_int_id -> its request (registered adapters)
        self._host: collections.OrderedDict[int, Arrays] = collections.OrderedDict()  # LRU order
        self.slot_of: dict[int, int] = {}  # lora_int_id -> device slot
        self._users: collections.Counter[int] = collections.Counter()  # requests pinning each adapter
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # resident, unpinned, LRU first
        self._free = list(range(max_loras, 0, -1))  # pop() hands out slot 1 first
        self._pinned: dict[str, int] = {}  # request id -> lora_int_id it pins
        self.num_loads = 0  # device writes (loads into a slot), for tests and stats
        self.num_evictions = 0

    # -- registry ---------------------------------------------------------------------

    def register(self, lora: LoRARequest) -> None:
        """Reads and checks an adapter the first time its id is seen. One id names one adapter:
        the same id with another name or path is refused."""
        known = self.known.get(lora.lora_int_id)
        if known is not None:
            if (known.lora_name, known.lora_path) != (lora.lora_name, lora.lora_path):
                raise ValueError(f"lora_int_id {lora.lora_int_id} is already adapter {known.lora_name!r} at "
                                 f"{known.lora_path!r}; got {lora.lora_name!r} at {lora.lora_path!r}")
            return
        self._keep_on_host(lora.lora_int_id, self._read(lora))
        self.known[lora.lora_int_id] = lora

    def remove(self, lora_int_id: int, num_unfinished: int = 0) -> None:
        """Forgets an adapter (its slot is freed). Refused (ValueError) while requests use it or
        wait for it (`num_unfinished`: the engine's count of unfinished requests naming it)."""
        if lora_int_id not in self.known:
            raise KeyError(lora_int_id)
        busy = max(self._users[lora_int_id], num_unfinished)
        if busy:
            raise ValueError(f"LoRA adapter {self.known[lora_int_id].lora_name!r} has {busy} unfinished "
                             "requests; unload it when they are done")
        del self.known[lora_int_id]
        self._host.pop(lora_int_id, None)
        slot = self.slot_of.pop(lora_int_id, None)
        if slot is not None:
            self._idle.pop(lora_int_id, None)
            self._free.append(slot)

    # -- slots (the scheduler's hooks) -------------------------------------------------

    def acquire(self, req: Request) -> bool:
        """Pins the request's adapter into a device slot (loading it when needed) and sets
        req.lora_slot. True for base-model requests; False when no slot can be had now."""
        lora = req.lora_request
        if lora is None or req.request_id in self._pinned:
            return True
        lid = lora.lora_int_id
        if lid not in self.slot_of and not self._load(lora):
            return False
        self._idle.pop(lid, None)
        self._users[lid] += 1
        self._pinned[req.request_id] = lid
        req.lora_slot = self.slot_of[lid]
        return True

    def release(self, req: Request) -> None:
        """Unpins the request's adapter (idempotent); unused, it becomes evictable."""
        lid = self._pinned.pop(req.request_id, None)
        if lid is None:
            return
        self._users[lid] -= 1
        if self._users[lid] == 0:
            del self._users[lid]
            if lid in self.slot_of:
                self._idle[lid] = None

    def _load(self, lora: LoRARequest) -> bool:
        if self._free:
            slot = self._free.pop()
        elif self._idle:
            victim, _ = self._idle.popitem(last=False)
            slot = self.slot_of.pop(victim)
            self.num_evictions += 1
            log.info("LoRA: evicting idle adapter %r from slot %d", self.known[victim].lora_name, slot)
        else:
            return False
        lid = lora.lora_int_id
        arrays = self._host.get(lid)
        if arrays is None:  # dropped from host memory since it was registered: read it again
            arrays = self._read(lora)
            self._keep_on_host(lid, arrays)
        self._host.move_to_end(lid)
        self._write(slot, arrays)
        self.slot_of[lid] = slot
        self.num_loads += 1
        log.info("LoRA: adapter %r loaded into slot %d", lora.lora_name, slot)
        return True

    def _keep_on_host(self, lid: int, arrays: Arrays) -> None:
        self._host[lid] = arrays
        self._host.move_to_end(lid)
        while len(self._host) > self.max_cpu_loras:
            self._host.popitem(last=False)

    def stats(self) -> dict[str, int]:
        return {"lora_loaded": len(self.slot_of), "lora_pinned": len(self._users), "lora_loads": self.num_loads,
                "lora_evictions": self.num_evictions}


def read_adapter(lora: LoRARequest, cfg, paths: list[tuple], max_lora_rank: int, dtype) -> Arrays:
    """A PEFT adapter (local directory, or a hub id when online) in the slot layout of the
    model's LoRA arrays (`paths`), checked against the base model `cfg` (a ModelConfig): rank,
    target modules, layer count and every shape (ValueError naming the adapter otherwise)."""
    from jaxserve.models.lora import load_lora_adapter
    from jaxserve.models.lora_layers import hf_module_shapes, slot_arrays, supported_modules
    from jaxserve.models.model_files import resolve_model_dir

    try:
        path = resolve_model_dir(lora.lora_path)
        adapter, weights = load_lora_adapter(path, hf_module_shapes(cfg), cfg.num_layers, max_lora_rank)
    except ValueError as e:
        raise ValueError(f"LoRA adapter {lora.lora_name!r}: {e}") from None
    unsupported = sorted(set(adapter.target_modules) - set(supported_modules(cfg)))
    if unsupported:
        raise ValueError(f"LoRA adapter {lora.lora_name!r}: target modules {unsupported} are not supported on "
                         f"{cfg.model_type} (its experts have no LoRA slots); supported: {supported_modules(cfg)}")
    return slot_arrays(cfg, weights, paths, max_lora_rank, dtype)
