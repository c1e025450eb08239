"""Soak test of a jaxserve server over loopback (issue 13): a mixed load for --duration seconds.

    .venv/bin/python scripts/soak.py --duration 60            # starts `jaxserve serve` (demo model, configs/cpu.yaml)
    .venv/bin/python scripts/soak.py --model DIR --config configs/cpu.yaml --duration 1800 --write
    .venv/bin/python scripts/soak.py --http http://127.0.0.1:8000 --grpc 127.0.0.1:50051 [--pid PID]

Load model: a closed loop of C concurrent clients, C = round(--load x max_num_seqs) from
gRPC GetModelInfo (the engine's sequence slots; at load 0.8 the engine is kept ~80% full).
Each client picks a request kind at random, sends it, waits for its end, and loops until
the duration is over (every loop is bounded by the deadline; no request is started after it).

Mix: 10% cancelled mid-stream (HTTP or gRPC; the client closes after a few tokens), 5% bad
requests that must get a 4xx / INVALID_ARGUMENT, 5% short deadlines (gRPC timeout / HTTP
client timeout of 20-300 ms), the rest normal requests split over HTTP /v1/completions and
/v1/chat/completions (streaming and not) and gRPC Generate / GenerateStream.

At the end: waits for the server to go idle (/metrics: nothing running or waiting, no KV page
in use), then prints a markdown table. Exit status 1 if any unexpected error, pages not all
free, or the server died. --write appends the table to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxserve.entrypoints.client import AsyncClient  # noqa: E402
from jaxserve.protos.v1 import generate_pb2 as pb  # noqa: E402
from jaxserve.sampling_params import SamplingParams  # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hum about "
         "jax compilers pages tokens streams and rivers under bright winter skies").split()


# ---------------------------------------------------------------- server process

class Server:
    """`python -m jaxserve.entrypoints.cli serve ...`, its log read on a thread to learn the ports."""

    def __init__(self, model: str | None, config: str, extra: list[str]):
        args = ([model] if model else []) + ["--config", config, "--host", "127.0.0.1",
                                             "--grpc-port", "0", "--http-port", "0", *extra]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "jaxserve.entrypoints.cli", "serve", *args], cwd=ROOT,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.grpc_port = self.http_port = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if m := re.search(r"gRPC listening on [\d.]+:(\d+)", line):
                self.grpc_port = int(m.group(1))
            if m := re.search(r"HTTP API on http://[\d.]+:(\d+)", line):
                self.http_port = int(m.group(1))

    def wait_for_ports(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.grpc_port is None or self.http_port is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start:\n" + "".join(self.lines[-40:]))
            time.sleep(0.1)

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            pass
    return out


# ---------------------------------------------------------------- the load

class Stats:
    def __init__(self):
        self.sent: Counter[str] = Counter()
        self.ok: Counter[str] = Counter()
        self.outcome: Counter[str] = Counter()  # ok / expected_4xx / deadline / cancelled / unexpected
        self.latency: list[float] = []
        self.ttft: list[float] = []
        self.unexpected: list[str] = []

    def bad(self, kind: str, what: str) -> None:
        self.outcome["unexpected"] += 1
        if len(self.unexpected) < 20:
            self.unexpected.append(f"{kind}: {what}"[:300])


def prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 60)))


class Load:
    def __init__(self, http_url: str, grpc_target: str, model_name: str, stats: Stats, end: float, seed: int):
        self.http_url, self.grpc_target, self.model = http_url.rstrip("/"), grpc_target, model_name
        self.stats, self.end, self.seed = stats, end, seed

    async def worker(self, i: int, http: httpx.AsyncClient, client: AsyncClient) -> None:
        rng = random.Random(self.seed * 1000 + i)
        while time.monotonic() < self.end:
            r = rng.random()
            if r < 0.10:
                kind = rng.choice(["cancel_http_completion", "cancel_http_chat", "cancel_grpc_stream"])
            elif r < 0.15:
                kind = rng.choice(["bad_http", "bad_grpc"])
            elif r < 0.20:
                kind = rng.choice(["deadline_http", "deadline_grpc"])
            else:
                kind = rng.choice(["http_completion", "http_completion_stream", "http_chat", "http_chat_stream",
                                   "grpc_generate", "grpc_stream"])
            self.stats.sent[kind] += 1
            try:
                await getattr(self, kind.replace("http_completion", "http_compl"))(rng, http, client, kind)
            except Exception as e:  # noqa: BLE001 - counted and shown
                self.stats.bad(kind, f"{type(e).__name__}: {e}")

    # ---- HTTP

    def _body(self, rng: random.Random, chat: bool, stream: bool, max_tokens: int | None = None) -> tuple[str, dict]:
        body = {"model": self.model, "max_tokens": max_tokens or rng.randint(8, 64),
                "temperature": rng.choice([0.0, 0.7, 1.0]), "stream": stream}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt(rng)}]
            return "/v1/chat/completions", body
        body["prompt"] = prompt(rng)
        return "/v1/completions", body

    async def _http_stream(self, http: httpx.AsyncClient, path: str, body: dict, stop_after: int | None = None,
                           timeout: float | None = None) -> tuple[int, float | None, int]:
        """(status, ttft, chunks); stops reading (closes the connection) after stop_after chunks."""
        t0, ttft, chunks = time.monotonic(), None, 0
        kw = {"timeout": timeout} if timeout else {}
        async with http.stream("POST", self.http_url + path, json=body, **kw) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return resp.status_code, None, 0
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                payload = json.loads(data)
                if "error" in payload:
                    raise RuntimeError(f"error event: {data[:200]}")
                chunks += 1
                if ttft is None:
                    ttft = time.monotonic() - t0
                if stop_after is not None and chunks >= stop_after:
                    return 200, ttft, chunks  # leaving the context closes the connection mid-stream
        return 200, ttft, chunks

    async def _http_one(self, rng, http, kind, chat: bool, stream: bool) -> None:
        path, body = self._body(rng, chat, stream)
        t0 = time.monotonic()
        if stream:
            status, ttft, _ = await self._http_stream(http, path, body)
        else:
            resp = await http.post(self.http_url + path, json=body)
            status, ttft = resp.status_code, None
            if status == 200:
                resp.json()["choices"][0]
        if status != 200:
            return self.stats.bad(kind, f"HTTP {status}")
        self.stats.latency.append(time.monotonic() - t0)
        if ttft is not None:
            self.stats.ttft.append(ttft)
        self.stats.ok[kind] += 1
        self.stats.outcome["ok"] += 1

    async def http_compl(self, rng, http, client, kind):
        await self._http_one(rng, http, kind, chat=False, stream=False)

    async def http_compl_stream(self, rng, http, client, kind):
        await self._http_one(rng, http, kind, chat=False, stream=True)

    async def http_chat(self, rng, http, client, kind):
        await self._http_one(rng, http, kind, chat=True, stream=False)

    async def http_chat_stream(self, rng, http, client, kind):
        await self._http_one(rng, http, kind, chat=True, stream=True)

    async def _cancel_http(self, rng, http, kind, chat: bool) -> None:
        path, body = self._body(rng, chat, True, max_tokens=rng.randint(40, 200))
        body["ignore_eos"] = True
        status, _, chunks = await self._http_stream(http, path, body, stop_after=rng.randint(1, 6))
        if status != 200:
            return self.stats.bad(kind, f"HTTP {status}")
        self.stats.outcome["cancelled"] += 1

    async def cancel_http_compl(self, rng, http, client, kind):
        await self._cancel_http(rng, http, kind, chat=False)

    async def cancel_http_chat(self, rng, http, client, kind):
        await self._cancel_http(rng, http, kind, chat=True)

    async def bad_http(self, rng, http, client, kind):
        base = {"model": self.model, "prompt": prompt(rng), "max_tokens": 8}
        case = rng.choice(["top_k", "max_tokens0", "malformed", "unknown_model", "temperature", "chat_top_k",
                           "n0", "top_p"])
        path, content = "/v1/completions", None
        if case == "top_k":
            base["top_k"] = -5
        elif case == "max_tokens0":
            base["max_tokens"] = 0
        elif case == "malformed":
            content = b'{"model": "x", "prompt": "hello", "max_tokens": 4'
        elif case == "unknown_model":
            base["model"] = "no-such-model"
        elif case == "temperature":
            base["temperature"] = -1.0
        elif case == "n0":
            base["n"] = 0
        elif case == "top_p":
            base["top_p"] = 1.5
        else:
            path = "/v1/chat/completions"
            base = {"model": self.model, "messages": [{"role": "user", "content": "hi"}], "top_k": -5}
        if content is not None:
            resp = await http.post(self.http_url + path, content=content, headers={"content-type": "application/json"})
        else:
            resp = await http.post(self.http_url + path, json=base)
        if 400 <= resp.status_code < 500:
            self.stats.outcome["expected_4xx"] += 1
        else:
            self.stats.bad(kind, f"{case}: HTTP {resp.status_code} {resp.text[:120]}")

    async def deadline_http(self, rng, http, client, kind):
        path, body = self._body(rng, rng.random() < 0.5, rng.random() < 0.5, max_tokens=rng.randint(32, 128))
        t0 = time.monotonic()
        try:
            if body["stream"]:
                status, _, _ = await self._http_stream(http, path, body, timeout=rng.uniform(0.02, 0.3))
            else:
                status = (await http.post(self.http_url + path, json=body, timeout=rng.uniform(0.02, 0.3))).status_code
        except httpx.TimeoutException:
            self.stats.outcome["deadline"] += 1
            return
        if status != 200:
            return self.stats.bad(kind, f"HTTP {status}")
        self.stats.latency.append(time.monotonic() - t0)
        self.stats.ok[kind] += 1
        self.stats.outcome["ok"] += 1  # finished inside its deadline

    # ---- gRPC

    def _params(self, rng, max_tokens=None, **kw) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens or rng.randint(8, 64), temperature=rng.choice([0.0, 0.7, 1.0]),
                              **kw)

    async def grpc_generate(self, rng, http, client, kind):
        t0 = time.monotonic()
        try:
            await client.generate(prompt(rng), self._params(rng), timeout=120)
        except grpc.RpcError as e:
            return self.stats.bad(kind, f"{e.code()} {e.details()}")
        self.stats.latency.append(time.monotonic() - t0)
        self.stats.ok[kind] += 1
        self.stats.outcome["ok"] += 1

    async def _grpc_stream(self, client, text, params, stop_after=None, timeout=120.0) -> tuple[float | None, int]:
        t0, ttft, n = time.monotonic(), None, 0
        stream = client.generate_stream(text, params, timeout=timeout)
        try:
            async for _ in stream:
                n += 1
                if ttft is None:
                    ttft = time.monotonic() - t0
                if stop_after is not None and n >= stop_after:
                    break
        finally:
            await stream.aclose()  # cancels the call
        return ttft, n

    async def grpc_stream(self, rng, http, client, kind):
        t0 = time.monotonic()
        try:
            ttft, _ = await self._grpc_stream(client, prompt(rng), self._params(rng))
        except grpc.RpcError as e:
            return self.stats.bad(kind, f"{e.code()} {e.details()}")
        self.stats.latency.append(time.monotonic() - t0)
        if ttft is not None:
            self.stats.ttft.append(ttft)
        self.stats.ok[kind] += 1
        self.stats.outcome["ok"] += 1

    async def cancel_grpc_stream(self, rng, http, client, kind):
        try:
            await self._grpc_stream(client, prompt(rng), self._params(rng, rng.randint(40, 200), ignore_eos=True),
                                    stop_after=rng.randint(1, 6))
        except grpc.RpcError as e:
            return self.stats.bad(kind, f"{e.code()} {e.details()}")
        self.stats.outcome["cancelled"] += 1

    async def bad_grpc(self, rng, http, client, kind):
        case = rng.choice(["top_k", "temperature", "both_prompts", "empty", "token_id", "top_p"])
        sp = pb.SamplingParams(max_tokens=8)
        req = pb.GenerateRequest(text=prompt(rng), sampling_params=sp)
        if case == "top_k":
            sp.top_k = -5
        elif case == "temperature":
            sp.temperature = -1.0
        elif case == "top_p":
            sp.top_p = 1.5
        elif case == "both_prompts":
            req.token_ids.extend([1, 2, 3])
        elif case == "empty":
            req.text = ""
        else:
            req.text = ""
            req.token_ids.extend([1, 2, 10**9])
        req.sampling_params.CopyFrom(sp)
        try:
            if rng.random() < 0.5:
                await client.stub.Generate(req, timeout=30, metadata=client._metadata)
            else:
                async for _ in client.stub.GenerateStream(req, timeout=30, metadata=client._metadata):
                    pass
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                self.stats.outcome["expected_4xx"] += 1
            else:
                self.stats.bad(kind, f"{case}: {e.code()} {e.details()}")
            return
        self.stats.bad(kind, f"{case}: accepted")

    async def deadline_grpc(self, rng, http, client, kind):
        t0 = time.monotonic()
        timeout = rng.uniform(0.02, 0.3)
        try:
            if rng.random() < 0.5:
                await client.generate(prompt(rng), self._params(rng, rng.randint(32, 128)), timeout=timeout)
            else:
                await self._grpc_stream(client, prompt(rng), self._params(rng, rng.randint(32, 128)), timeout=timeout)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                self.stats.outcome["deadline"] += 1
            else:
                self.stats.bad(kind, f"{e.code()} {e.details()}")
            return
        self.stats.latency.append(time.monotonic() - t0)
        self.stats.ok[kind] += 1
        self.stats.outcome["ok"] += 1


# ---------------------------------------------------------------- main

def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def metrics(http: httpx.AsyncClient, url: str) -> dict[str, float]:
    return parse_metrics((await http.get(url.rstrip("/") + "/metrics", timeout=10)).text)


async def run(args, http_url: str, grpc_target: str, pid: int | None, server: Server | None) -> int:
    async with AsyncClient(grpc_target, timeout=120) as client, \
            httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=512,
                                                               max_keepalive_connections=64)) as http:
        await client.wait_until_serving(args.startup_timeout)
        info = await client.model_info()
        model_name = (await http.get(http_url.rstrip("/") + "/v1/models")).json()["data"][0]["id"]
        concurrency = max(1, round(args.load * info.max_num_seqs))
        rss0 = rss_mib(pid)
        m0 = await metrics(http, http_url)
        load0 = os.getloadavg()
        print(f"soak: {concurrency} concurrent clients (= {args.load} x max_num_seqs {info.max_num_seqs}) for "
              f"{args.duration:.0f} s; model {model_name}; http {http_url}, grpc {grpc_target}", flush=True)

        stats = Stats()
        t0 = time.monotonic()
        end = t0 + args.duration
        load = Load(http_url, grpc_target, model_name, stats, end, args.seed)
        peak_rss = rss0 or 0.0

        async def monitor():
            nonlocal peak_rss
            while time.monotonic() < end:
                await asyncio.sleep(min(10.0, max(0.1, end - time.monotonic())))
                r = rss_mib(pid)
                peak_rss = max(peak_rss, r or 0.0)
                if server is not None and server.proc.poll() is not None:
                    return
                if args.progress:
                    print(f"  t={time.monotonic() - t0:6.0f}s sent={sum(stats.sent.values())} "
                          f"ok={stats.outcome['ok']} unexpected={stats.outcome['unexpected']} rss={r} MiB",
                          flush=True)

        await asyncio.gather(monitor(), *(load.worker(i, http, client) for i in range(concurrency)))
        elapsed = time.monotonic() - t0

        # Wait for the server to go idle: nothing running or waiting, every page free.
        died = server is not None and server.proc.poll() is not None
        m1: dict[str, float] = {}
        idle_deadline = time.monotonic() + args.idle_timeout
        while not died:
            try:
                m1 = await metrics(http, http_url)
            except httpx.HTTPError:
                died = True
                break
            if (m1.get("jaxserve_num_requests_running", 1) == 0 and m1.get("jaxserve_num_requests_waiting", 1) == 0
                    and m1.get("jaxserve_kv_cache_pages_used", 1) == 0) or time.monotonic() > idle_deadline:
                break
            await asyncio.sleep(0.5)
        try:
            health = await client.health(timeout=5)
        except grpc.RpcError as e:
            health = f"unreachable ({e.code()})"
        rss1 = rss_mib(pid)
        peak_rss = max(peak_rss, rss1 or 0.0)
        load1 = os.getloadavg()

    total = m1.get("jaxserve_kv_cache_pages_total")
    used = m1.get("jaxserve_kv_cache_pages_used")
    free = None if total is None or used is None else total - used
    gen_tokens = m1.get("jaxserve_generation_tokens_total", 0) - m0.get("jaxserve_generation_tokens_total", 0)
    if server is not None:
        died = died or server.proc.poll() is not None
    o = stats.outcome
    sent = sum(stats.sent.values())

    def mib(x):
        return "n/a" if x is None else f"{x:.0f} MiB"

    rows = [
        ("duration", f"{elapsed:.0f} s (requested {args.duration:.0f} s)"),
        ("load", f"{concurrency} concurrent closed-loop clients = {args.load} x max_num_seqs {info.max_num_seqs}"),
        ("requests sent", f"{sent}: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.sent.items()))),
        ("served OK", f"{o['ok']} (" + ", ".join(f"{k} {v}" for k, v in sorted(stats.ok.items())) + ")"),
        ("expected 4xx / INVALID_ARGUMENT", str(o["expected_4xx"])),
        ("deadline exceeded (expected)", str(o["deadline"])),
        ("cancelled mid-stream (expected)", str(o["cancelled"])),
        ("**unexpected errors**", f"**{o['unexpected']}**"),
        ("latency e2e p50 / p99 (OK requests)", f"{pct(stats.latency, 0.5) * 1e3:.0f} / {pct(stats.latency, 0.99) * 1e3:.0f} ms"),
        ("TTFT p50 / p99 (OK streams)", f"{pct(stats.ttft, 0.5) * 1e3:.0f} / {pct(stats.ttft, 0.99) * 1e3:.0f} ms"),
        ("generated tokens/s (server counter)", f"{gen_tokens / elapsed:.1f} ({gen_tokens:.0f} tokens)"),
        ("KV pages free at end / total", f"{free:.0f} / {total:.0f}" if free is not None else "n/a"),
        ("server RSS start / end / peak", f"{mib(rss0)} / {mib(rss1)} / {mib(peak_rss or None)}"),
        ("server RSS growth", "n/a" if rss0 is None or rss1 is None else f"{rss1 - rss0:+.0f} MiB "
                                                                        f"({(rss1 - rss0) / rss0 * 100:+.1f}%)"),
        ("load average (1/5/15 min) start / end", " ".join(f"{x:.2f}" for x in load0) + " / "
         + " ".join(f"{x:.2f}" for x in load1)),
        ("server health at end", "died" if died else health),
    ]
    exit_code = None
    if server is not None:
        log_errors = sum(1 for line in server.lines if " ERROR " in line or line.startswith("Traceback"))
        exit_code = server.stop()
        rows.append(("server ERROR lines / tracebacks in log", str(log_errors)))
        rows.append(("server exit status after SIGTERM", str(exit_code)))

    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    print()
    print(table)
    if stats.unexpected:
        print("\nunexpected errors (first 20):")
        for line in stats.unexpected:
            print("  " + line)

    failures = []
    if o["unexpected"]:
        failures.append(f"{o['unexpected']} unexpected errors")
    if free is None or free != total:
        failures.append(f"KV pages not all free: {free} / {total}")
    if died:
        failures.append("the server died")
    if server is not None and exit_code != 0:
        failures.append(f"server exited {exit_code} on SIGTERM")
    if failures:
        print("\nFAIL: " + "; ".join(failures))
    else:
        print("\nPASS")

    if args.write:
        cpu = platform.processor() or platform.machine()
        try:
            cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                       if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        head = (f"\n## Soak: scripts/soak.py, {datetime.date.today().isoformat()}\n\n"
                f"Machine: {platform.node()}, {cpu}, {os.cpu_count()} CPUs; model {model_name} "
                f"({info.platform}, max_num_seqs {info.max_num_seqs}, {info.num_pages} pages of {info.page_size}); "
                f"load {args.load} ({concurrency} clients); mix: 10% cancelled, 5% bad, 5% short deadlines.\n"
                f"Command: `{' '.join(['python', 'scripts/soak.py', *sys.argv[1:]])}`. "
                f"Result: {'PASS' if not failures else 'FAIL: ' + '; '.join(failures)}.\n\n")
        with open(ROOT / "BENCHMARKS.md", "a") as f:
            f.write(head + table + "\n")
        print("appended to BENCHMARKS.md")
    return 1 if failures else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=1800, help="seconds of load (default 1800)")
    p.add_argument("--load", type=float, default=0.8, help="fraction of max_num_seqs kept busy (default 0.8)")
    p.add_argument("--model", help="model for the started server (default: the demo model)")
    p.add_argument("--config", default="configs/cpu.yaml", help="preset for the started server")
    p.add_argument("--server-arg", action="append", default=[], help="extra argument to `serve` (repeatable)")
    p.add_argument("--http", help="existing server's HTTP base URL (with --grpc): no server is started")
    p.add_argument("--grpc", help="existing server's gRPC HOST:PORT")
    p.add_argument("--pid", type=int, help="existing server's pid, for RSS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--idle-timeout", type=float, default=60, help="seconds to wait for the server to go idle")
    p.add_argument("--progress", action="store_true", help="print a line every 10 s")
    p.add_argument("--write", action="store_true", help="append the table to BENCHMARKS.md")
    args = p.parse_args()
    for url in filter(None, [args.http, args.grpc]):
        host = url.split("//")[-1].rsplit(":", 1)[0]
        if host not in ("127.0.0.1", "localhost", "[::1]"):
            p.error(f"loopback only: {url}")
    if bool(args.http) != bool(args.grpc):
        p.error("--http and --grpc go together")
    if args.http:
        return asyncio.run(run(args, args.http, args.grpc, args.pid, None))
    server = Server(args.model, args.config, args.server_arg)
    try:
        server.wait_for_ports(args.startup_timeout)
        return asyncio.run(run(args, f"http://127.0.0.1:{server.http_port}", f"127.0.0.1:{server.grpc_port}",
                               server.proc.pid, server))
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)
        if server.proc.returncode not in (0, None) and "-v" in sys.argv:
            print("".join(server.lines[-40:]))


if __name__ == "__main__":
    sys.exit(main())
