"""StepShapes against the real scheduler: for every preset's bucket lists, any request mix
(n up to max_num_seqs, chunked prefills, preemption, overlapped scheduling) produces only
steps whose programs warm-up compiles."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxserve.config import EngineConfig
from jaxserve.core.kv_cache_manager import KVCacheManager
from jaxserve.core.request import Request
from jaxserve.core.scheduler import Scheduler
from jaxserve.core.step_shapes import StepShapes
from jaxserve.sampling_params import SamplingParams

CONFIGS = Path(__file__).parents[3] / "configs"
PRESETS = sorted(p.name for p in CONFIGS.glob("*.yaml"))


def shapes_of(cfg: EngineConfig) -> StepShapes:
    return StepShapes(cfg.token_buckets, cfg.seq_buckets, cfg.max_num_seqs)


def compiled(shapes: StepShapes) -> set[tuple[str, int]]:
    return set(shapes.programs())


class Sim:
    """The scheduler driven as the overlapped engine drives it: step N+1 is scheduled
    before step N's tokens are applied; every sampled token is a fixed non-stop id."""

    def __init__(self, cfg: EngineConfig, num_pages: int, max_model_len: int):
        self.kv = KVCacheManager(num_pages, cfg.page_size, -(-max_model_len // cfg.page_size),
                                 enable_prefix_caching=True)
        self.sched = Scheduler(self.kv, max_num_seqs=cfg.max_num_seqs,
                               max_num_batched_tokens=cfg.max_num_batched_tokens, max_model_len=max_model_len)
        self.shapes = shapes_of(cfg)
        self.programs = compiled(self.shapes)
        self.in_flight = None
        self.seen: set[tuple[int, int]] = set()

    def add(self, rid: str, prompt_len: int, n: int, max_tokens: int) -> None:
        params = SamplingParams(n=n, max_tokens=max_tokens, ignore_eos=True)
        self.sched.add_request(Request(rid, [7] * prompt_len, params, max_tokens=max_tokens,
                                       eos_token_ids=frozenset(), seed=0))

    def step(self) -> None:
        out = self.sched.schedule()
        if not out.is_empty:
            rows = out.num_sample_rows
            t, r = self.shapes.check(out.num_tokens, len(out.seqs), rows)
            assert ("body", t) in self.programs and ("sample", r) in self.programs
            self.seen.add((out.num_tokens, rows))
        previous, self.in_flight = self.in_flight, (None if out.is_empty else out)
        if previous is not None:
            self._apply(previous)
        elif out.is_empty:
            return

    def _apply(self, out) -> None:
        sampled = [(9, None)] * out.num_sample_rows
        self.sched.update(out, sampled, lambda parent, k: Request(
            f"{parent.request_id}#{k}", parent.prompt_token_ids, parent.params, max_tokens=parent.max_tokens,
            eos_token_ids=frozenset(), seed=0, sample_index=k, parent_id=parent.request_id))

    def drain(self, limit: int = 10_000) -> None:
        for _ in range(limit):
            if not (self.sched.has_unfinished() or self.in_flight):
                return
            self.step()
            if self.in_flight is not None and not self.sched.has_unfinished():
                self._apply(self.in_flight)
                self.in_flight = None
        raise AssertionError("the simulation did not finish")


def _any_request_mix(preset, data):
    cfg = EngineConfig.load(CONFIGS / preset)
    max_model_len = 4096
    num_pages = data.draw(st.sampled_from([64, 4096]), label="num_pages")  # 64: preemption
    sim = Sim(cfg, num_pages, max_model_len)
    page = cfg.page_size
    for i in range(data.draw(st.integers(1, 24), label="requests")):
        n = data.draw(st.sampled_from([1, 1, 2, 12, cfg.max_num_seqs]), label="n")
        prompt = data.draw(st.integers(1, 2 * cfg.max_num_batched_tokens), label="prompt")
        max_tokens = data.draw(st.integers(1, 40), label="max_tokens")
        if -(-prompt // page) + n * (-(-max_tokens // page) + 1) > num_pages or prompt + max_tokens > max_model_len:
            continue  # the engine's input check refuses it
        sim.add(f"r{i}", prompt, n, max_tokens)
        for _ in range(data.draw(st.integers(0, 3), label="steps between arrivals")):
            sim.step()
    sim.drain()
    assert sim.kv.num_free_pages == sim.kv.num_total_pages


# 12 examples a preset took 20-25 s of make test (up to 7 s for one preset with 256 sequences): make
# test draws 4 a preset (new ones each run), the slow twin 20 more.
@pytest.mark.parametrize("preset", PRESETS)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_step_of_any_request_mix_is_in_the_warm_up_set(preset, data):
    _any_request_mix(preset, data)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_step_of_many_request_mixes_is_in_the_warm_up_set(preset, data):
    _any_request_mix(preset, data)


def test_the_issues_n_examples_fit_the_compiled_set():
    """gpu-h100-1: 40 decodes plus the last 5-token chunk of an n=32 prompt is 45 tokens and
    72 rows; CPU-sized: token buckets [8, 32], seq buckets [4, 16], n=12 and a 5-token prompt."""
    h100 = shapes_of(EngineConfig.load(CONFIGS / "gpu-h100-1.yaml"))
    assert h100.check(45, 41, 72) == (64, 128)
    small = StepShapes((8, 32), (4, 16), 16)
    assert small.check(5, 1, 12) == (8, 16)
    sim = Sim(EngineConfig(max_num_seqs=16, max_num_batched_tokens=32, token_buckets=(8, 32), seq_buckets=(4, 16)),
              256, 512)
    sim.add("n12", 5, 12, 6)
    sim.drain()
    assert (5, 12) in sim.seen


def test_presets_compile_a_third_of_the_old_pair_matrix():
    for preset in ("gpu-h200-1.yaml", "tpu-v6e-8.yaml"):
        cfg = EngineConfig.load(CONFIGS / preset)
        shapes = shapes_of(cfg)
        pairs = [(t, s) for t in cfg.token_buckets for s in cfg.seq_buckets if s <= t]
        assert len(shapes.programs()) + 5 <= 2 * len(pairs) / 3  # + the state programs


def test_shapes_refuse_steps_outside_the_set():
    shapes = StepShapes((16, 64), (4, 8), 8)
    with pytest.raises(AssertionError, match="outside the compiled shapes"):
        shapes.check(65, 1, 1)
    with pytest.raises(AssertionError, match="outside the compiled shapes"):
        shapes.check(16, 1, 9)
    with pytest.raises(ValueError, match="max_num_seqs"):
        StepShapes((16,), (4,), 8)
