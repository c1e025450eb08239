"""LoRAManager on its own (no device): slot hand-out, pins, LRU eviction of idle adapters only,
the host cache of max_cpu_loras adapters, unload refusals; exact slots and read / write logs."""

from __future__ import annotations

import pytest

from jaxserve.core.request import Request
from jaxserve.engine.lora_manager import LoRAManager
from jaxserve.lora_request import LoRARequest
from jaxserve.sampling_params import SamplingParams

LORAS = {i: LoRARequest(f"a{i}", i, f"/adapters/{i}") for i in range(1, 6)}


def make(max_loras=2, max_cpu_loras=None):
    reads, writes = [], []

    def read(lora):
        reads.append(lora.lora_int_id)
        return {("w",): lora.lora_int_id}

    mgr = LoRAManager(max_loras=max_loras, max_cpu_loras=max_cpu_loras, read=read,
                      write=lambda slot, arrays: writes.append((slot, arrays[("w",)])))
    for lora in LORAS.values():
        mgr.register(lora)
    return mgr, reads, writes


def req(rid: str, lora_id: int | None) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(), max_tokens=4, eos_token_ids=frozenset(), seed=0,
                   lora_request=LORAS[lora_id] if lora_id else None)


def test_slots_pins_and_lru_eviction_of_idle_adapters_only():
    mgr, _, writes = make(max_loras=2, max_cpu_loras=5)
    base = req("b", None)
    assert mgr.acquire(base) and base.lora_slot == 0
    r1, r2, r3 = req("r1", 1), req("r2", 2), req("r3", 3)
    assert mgr.acquire(r1) and r1.lora_slot == 1
    assert mgr.acquire(r2) and r2.lora_slot == 2
    assert not mgr.acquire(r3)  # both slots pinned: r3 waits
    assert writes == [(1, 1), (2, 2)]
    r1b = req("r1b", 1)
    assert mgr.acquire(r1b) and r1b.lora_slot == 1 and len(writes) == 2  # resident: no write
    mgr.release(r2)
    assert mgr.acquire(r3) and r3.lora_slot == 2  # adapter 2 was idle: evicted
    assert writes[-1] == (2, 3) and mgr.num_evictions == 1
    mgr.release(r1)
    assert not mgr.acquire(req("r4", 4))  # adapter 1 is still pinned by r1b
    mgr.release(r1b)
    mgr.release(r1b)  # idempotent
    mgr.release(r3)  # idle now, LRU order: 1 (released first), then 3
    r4, r5 = req("r4", 4), req("r5", 5)
    assert mgr.acquire(r4) and r4.lora_slot == 1
    assert mgr.acquire(r5) and r5.lora_slot == 2
    assert mgr.stats() == {"lora_loaded": 2, "lora_pinned": 2, "lora_loads": 5, "lora_evictions": 3}


def test_host_cache_keeps_max_cpu_loras_and_rereads_the_rest():
    mgr, reads, _ = make(max_loras=1, max_cpu_loras=2)
    assert reads == [1, 2, 3, 4, 5]  # registration reads and checks each adapter once
    a = req("a", 1)
    assert mgr.acquire(a)  # adapter 1 fell out of the host cache: read again
    assert reads[-1] == 1 and len(reads) == 6
    mgr.release(a)
    b = req("b", 5)
    assert mgr.acquire(b) and len(reads) == 6  # adapter 5 is cached


def test_register_and_remove_refusals():
    mgr, _, _ = make()
    with pytest.raises(ValueError, match="already adapter 'a1'"):
        mgr.register(LoRARequest("other", 1, "/adapters/1"))
    mgr.register(LoRARequest("a1", 1, "/adapters/1"))  # the same adapter again: fine
    r = req("r", 1)
    assert mgr.acquire(r)
    with pytest.raises(ValueError, match="1 unfinished"):
        mgr.remove(1)
    mgr.release(r)
    with pytest.raises(ValueError, match="2 unfinished"):
        mgr.remove(1, num_unfinished=2)  # waiting requests name it
    mgr.remove(1)
    assert 1 not in mgr.known and 1 not in mgr.slot_of
    with pytest.raises(KeyError):
        mgr.remove(1)
