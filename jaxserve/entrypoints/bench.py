"""`jaxserve bench`: a serving benchmark against a running `jaxserve serve` (gRPC).

Sends a synthetic workload (random token-id prompts and output lengths from a fixed seed,
EOS ignored so every request produces exactly its length) at a Poisson request rate (or all
at once), optionally capped at a number of requests in flight, streams every response, and
reports request and token throughput with TTFT, TPOT (time per output token after the first)
and end-to-end latency percentiles. It measures the server as a client sees it: network,
queueing and detokenization included.

It fits its workload to the server it measures: the lengths are clamped (and the output says
so) so that no request's prompt + output exceeds the max_model_len that GetModelInfo reports.
A request the server refuses or fails (any gRPC error, at the start or mid-stream) is counted
in the table by status code, never fatal: the run goes on and reports what was served.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import statistics
import time
from typing import Any, Callable

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

    def fit(self, max_model_len: int) -> tuple["Workload", str | None]:
        """This workload with its length ranges clamped so that the longest prompt plus the longest
        output fits `max_model_len` (the server refuses any request that does not), both maxima
        shrunk in proportion; and a note saying what changed (None if nothing did)."""
        (p_lo, p_hi), (o_lo, o_hi) = self.prompt_len, self.output_len
        limit = max_model_len
        if p_hi + o_hi <= limit:
            return self, None
        if limit < 2:
            raise ValueError(f"the server's max_model_len is {limit}: no prompt and output fit")
        p_new = min(limit - 1, max(1, limit * p_hi // (p_hi + o_hi)))
        o_new = limit - p_new
        fitted = dataclasses.replace(self, prompt_len=(min(p_lo, p_new), p_new), output_len=(min(o_lo, o_new), o_new))
        note = (f"the server's max_model_len is {limit}, but prompt {p_lo}-{p_hi} + output {o_lo}-{o_hi} tokens "
                f"can reach {p_hi + o_hi}: clamped to prompt {_range(fitted.prompt_len)}, output "
                f"{_range(fitted.output_len)} tokens (prompt + output <= {limit})")
        return fitted, note


def _range(r: tuple[int, int]) -> str:
    return f"{r[0]}-{r[1]}"


@dataclasses.dataclass
class RequestTiming:
    ttft: float
    e2e: float
    output_tokens: int
    error: str | None = None  # the gRPC status code name (or exception type) of a refused or failed request
    error_message: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


async def _one(client, prompt: list[int], max_tokens: int, limit: asyncio.Semaphore | None) -> RequestTiming:
    """One streamed request; a refusal or failure is returned as a RequestTiming with `error` set."""
    import grpc

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    async with limit if limit is not None else _nullcontext():
        start = time.perf_counter()
        ttft, tokens = None, 0
        try:
            async for delta in client.generate_stream(prompt, params):
                tokens += sum(len(c.token_ids) for c in delta.outputs)
                if ttft is None and tokens:
                    ttft = time.perf_counter() - start
        except asyncio.CancelledError:
            raise
        except grpc.RpcError as e:
            code = e.code() if callable(getattr(e, "code", None)) else None
            details = e.details() if callable(getattr(e, "details", None)) else str(e)
            return RequestTiming(float("nan"), time.perf_counter() - start, tokens,
                                 error=code.name if code is not None else type(e).__name__, error_message=details or "")
        except Exception as e:  # noqa: BLE001 - a client-side failure of one request is reported, not fatal
            return RequestTiming(float("nan"), time.perf_counter() - start, tokens, error=type(e).__name__,
                                 error_message=str(e))
        return RequestTiming(ttft if ttft is not None else float("nan"), time.perf_counter() - start, tokens)


class _nullcontext:
    async def __aenter__(self):
        return None

    async def __aexit__(self, *exc):
        return False


async def run(target: str, workload: Workload, *, request_rate: float = float("inf"),
              max_concurrency: int | None = None, api_key: str | None = None, fit: bool = True,
              notify: Callable[[str], None] | None = print, client: Any = None) -> dict[str, Any]:
    """Runs the workload against the server at `target`; returns the summary dict.

    `fit`: clamp the workload to the server's max_model_len (see Workload.fit), reported through
    `notify` and in the summary's `notes`. `client`: an AsyncClient-like object to use instead of
    connecting to `target` (tests); it is not closed here."""
    from jaxserve.entrypoints.client import AsyncClient

    own = client is None
    client = AsyncClient(target, api_key=api_key) if own else client
    notes: list[str] = []
    try:
        info = await client.model_info()
        if fit and info.max_model_len > 0:
            workload, note = workload.fit(info.max_model_len)
            if note:
                notes.append(note)
                if notify is not None:
                    notify(f"note: {note}")
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
        if own:
            await client.close()
    return summarize(timings, elapsed, model=info.model, max_model_len=info.max_model_len,
                     prompt_len=list(workload.prompt_len), output_len=list(workload.output_len), notes=notes,
                     prompt_tokens=sum(len(p) for p, _ in work))


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] if values else float("nan")


def summarize(timings: list[RequestTiming], elapsed: float, **extra: Any) -> dict[str, Any]:
    """Throughput counts every token received (failed requests' too); latencies and req/s count
    only the requests that completed; `errors` counts the others by status code."""
    failed = [t for t in timings if t.error is not None]
    errors: dict[str, int] = {}
    examples: dict[str, str] = {}
    for t in failed:
        errors[t.error] = errors.get(t.error, 0) + 1
        examples.setdefault(t.error, t.error_message)
    timings_all, timings = timings, [t for t in timings if t.error is None]
    out_tokens = sum(t.output_tokens for t in timings_all)
    elapsed = max(elapsed, 1e-9)
    summary: dict[str, Any] = {**extra, "requests": len(timings_all), "completed": len(timings),
                               "failed": len(failed), "errors": errors, "error_examples": examples,
                               "duration_s": elapsed, "requests_per_s": len(timings) / elapsed,
                               "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / elapsed}
    for name, values in (("ttft", [t.ttft for t in timings]), ("tpot", [t.tpot for t in timings if t.tpot]),
                         ("e2e", [t.e2e for t in timings])):
        summary[f"{name}_mean_ms"] = 1e3 * statistics.fmean(values) if values else float("nan")
        for q in (50, 90, 99):
            summary[f"{name}_p{q}_ms"] = 1e3 * _pct(values, q)
    return summary


def format_table(s: dict[str, Any]) -> str:
    completed, failed = s.get("completed", s["requests"]), s.get("failed", 0)
    lines = [f"model {s['model']}: {s['requests']} requests in {s['duration_s']:.1f} s, {completed} completed, "
             f"{failed} refused/failed; {s['requests_per_s']:.2f} req/s, {s['output_tokens_per_s']:.1f} output tok/s"]
    if s.get("prompt_len") and s.get("output_len"):
        lines.append(f"workload: prompt {_range(s['prompt_len'])}, output {_range(s['output_len'])} tokens; "
                     f"server max_model_len {s.get('max_model_len', '?')}")
    lines += ["| metric | mean ms | p50 ms | p90 ms | p99 ms |", "|---|---|---|---|---|"]
    for name in ("ttft", "tpot", "e2e"):
        lines.append(f"| {name.upper()} | {s[f'{name}_mean_ms']:.1f} | {s[f'{name}_p50_ms']:.1f} | "
                     f"{s[f'{name}_p90_ms']:.1f} | {s[f'{name}_p99_ms']:.1f} |")
    if s.get("errors"):
        lines += ["", "| refused/failed | requests | first message |", "|---|---|---|"]
        for code, n in sorted(s["errors"].items(), key=lambda kv: -kv[1]):
            msg = " ".join(str(s.get("error_examples", {}).get(code, "")).split())
            lines.append(f"| {code} | {n} | {msg[:120].replace('|', '/')} |")
    for note in s.get("notes", ()):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"expected MIN-MAX (e.g. 32-512), got {text!r}") from None
