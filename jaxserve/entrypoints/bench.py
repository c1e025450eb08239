"""`jaxserve bench`: a serving benchmark against a running `jaxserve serve` (gRPC).

Sends a synthetic workload (random token-id prompts and output lengths from a fixed seed,
EOS ignored so every request produces exactly its length) at a Poisson request rate (or all
at once), optionally capped at a number of requests in flight, streams every response, and
reports request and token throughput with TTFT, TPOT (time per output token after the first)
and end-to-end latency percentiles. It measures the server as a client sees it: network,
queueing and detokenization included.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import statistics
import time
from typing import Any

from jaxserve.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class Workload:
    num_requests: int = 128
    prompt_len: tuple[int, int] = (32, 512)
    output_len: tuple[int, int] = (32, 256)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("prompt_len", "output_len"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be a range MIN-MAX with 1 <= MIN <= MAX, got {lo}-{hi}")
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")

    def requests(self, vocab_size: int) -> list[tuple[list[int], int]]:
        rng = random.Random(self.seed)
        return [([rng.randrange(10, vocab_size) for _ in range(rng.randint(*self.prompt_len))],
                 rng.randint(*self.output_len)) for _ in range(self.num_requests)]


@dataclasses.dataclass
class RequestTiming:
    ttft: float
    e2e: float
    output_tokens: int

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


async def _one(client, prompt: list[int], max_tokens: int, limit: asyncio.Semaphore | None) -> RequestTiming:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    async with limit if limit is not None else _nullcontext():
        start = time.perf_counter()
        ttft, tokens = None, 0
        async for delta in client.generate_stream(prompt, params):
            tokens += sum(len(c.token_ids) for c in delta.outputs)
            if ttft is None and tokens:
                ttft = time.perf_counter() - start
        return RequestTiming(ttft if ttft is not None else float("nan"), time.perf_counter() - start, tokens)


class _nullcontext:
    async def __aenter__(self):
        return None

    async def __aexit__(self, *exc):
        return False


async def run(target: str, workload: Workload, *, request_rate: float = float("inf"),
              max_concurrency: int | None = None, api_key: str | None = None) -> dict[str, Any]:
    """Runs the workload against the server at `target`; returns the summary dict."""
    from jaxserve.entrypoints.client import AsyncClient

    client = AsyncClient(target, api_key=api_key)
    try:
        info = await client.model_info()
        work = workload.requests(info.vocab_size)
        limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        rng = random.Random(workload.seed + 1)
        tasks = []
        start = time.perf_counter()
        for prompt, n in work:
            tasks.append(asyncio.create_task(_one(client, prompt, n, limit)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        timings = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    finally:
        await client.close()
    return summarize(timings, elapsed, model=info.model, prompt_tokens=sum(len(p) for p, _ in work))


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] if values else float("nan")


def summarize(timings: list[RequestTiming], elapsed: float, **extra: Any) -> dict[str, Any]:
    out_tokens = sum(t.output_tokens for t in timings)
    summary: dict[str, Any] = {**extra, "requests": len(timings), "duration_s": elapsed,
                               "requests_per_s": len(timings) / elapsed, "output_tokens": out_tokens,
                               "output_tokens_per_s": out_tokens / elapsed}
    for name, values in (("ttft", [t.ttft for t in timings]), ("tpot", [t.tpot for t in timings if t.tpot]),
                         ("e2e", [t.e2e for t in timings])):
        summary[f"{name}_mean_ms"] = 1e3 * statistics.fmean(values) if values else float("nan")
        for q in (50, 90, 99):
            summary[f"{name}_p{q}_ms"] = 1e3 * _pct(values, q)
    return summary


def format_table(s: dict[str, Any]) -> str:
    lines = [f"model {s['model']}: {s['requests']} requests in {s['duration_s']:.1f} s, "
             f"{s['requests_per_s']:.2f} req/s, {s['output_tokens_per_s']:.1f} output tok/s",
             "| metric | mean ms | p50 ms | p90 ms | p99 ms |", "|---|---|---|---|---|"]
    for name in ("ttft", "tpot", "e2e"):
        lines.append(f"| {name.upper()} | {s[f'{name}_mean_ms']:.1f} | {s[f'{name}_p50_ms']:.1f} | "
                     f"{s[f'{name}_p90_ms']:.1f} | {s[f'{name}_p99_ms']:.1f} |")
    return "\n".join(lines)


def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"expected MIN-MAX (e.g. 32-512), got {text!r}") from None
